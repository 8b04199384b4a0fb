--[[
_lib.lua: helpers shared by the kvrouter scripts. Not a script of its own: the loader
(kvrouter/index/scripts.py) splices it in after each script's header, so every script stays a
single self-contained EVALSHA body.

Conventions every script follows:
  * Every ZSET score kvrouter writes (wrk, cut, head, workers, lease) is a "valid until" time
    in whole microseconds since the epoch, except lru's: a block's last access time (us),
    the one order capacity trimming follows, whichever source (router dispatch, engine event,
    notice) wrote the record and however long that source lets it live. A record is live while its score is >= now. Each block of a
    chain gets a score 1 us older than the block before it, in both sets, so trimming and
    expiry cut a chain's tail before its head (the prefix property). Integer scores matter: Redis formats
    an integral double in a reply several times faster than a fractional one, and 1 us steps
    keep one chain's scores together in the ZSET, so inserts stay cache-local. Integers up to
    2^53 us are exact in a double (until the year 2255). Callers pass times and TTLs in ms.
  * Arguments are checked before the first write: a bad argument can never leave a
    half-written record. Errors are replies "KVR <code> <argument>: <message>" with the
    negative codes mirrored in kvrouter/index/errors.py.
]]

local CHUNK = 256

-- One variadic command over a long list, in slices: redis.call(cmd, key, [opts[1], opts[2]],
-- <slice>) for each run of `per` * CHUNK items (`per`: list items per member, 1, or 2 for
-- score/member and field/value pairs), so no call unpacks more values than Lua's C stack
-- holds. `opts`: nil or a pair of option words (ZADD's GT CH). Returns the sum of the
-- integer replies and the table replies concatenated in list order (false for a nil).
local function batches(list, per, cmd, key, opts)
  local step, n = CHUNK * per, #list
  local sum, out = 0, {}
  for i = 1, n, step do
    local j = math.min(i + step - 1, n)
    local r
    if opts then
      r = redis.call(cmd, key, opts[1], opts[2], unpack(list, i, j))
    else
      r = redis.call(cmd, key, unpack(list, i, j))
    end
    if type(r) == 'table' then
      for k = 1, #r do out[#out + 1] = r[k] end
    else
      sum = sum + r
    end
  end
  return sum, out
end

-- Narrow the interval (lo, hi) of a worker's consecutive run to adjacent positions and return
-- lo, the last position held. Positions 1..lo are held, position hi is not (n + 1: unknown);
-- `miss(positions)` probes sorted positions inside the interval in one call and returns the
-- index of the first one not held (nil if all are). Each further round probes an 8-way split
-- of what is left. Used by lookup_chain and lookup_tiers.
local function narrow_held(miss, positions, lo, hi, n)
  while true do
    local m = miss(positions)
    if m == nil then
      lo = positions[#positions]
    else
      hi = positions[m]
      if m > 1 then lo = positions[m - 1] end
    end
    if hi - lo <= 1 or lo == n then return lo end
    local top = math.min(hi, n + 1)
    local span = top - lo - 1
    local k = math.min(span, 7)
    positions = {}
    for t = 1, k do positions[t] = lo + math.floor(t * (span + 1) / (k + 1)) end
  end
end

local function fail(code, arg, msg)
  return redis.error_reply('KVR ' .. code .. ' ' .. arg .. ': ' .. msg)
end

-- An integer >= lo, or nil.
local function int_arg(v, lo)
  local n = tonumber(v)
  if n == nil or n ~= math.floor(n) or n < lo then return nil end
  return n
end

-- now in us: the caller's value (given in ms) when positive, else the server clock (one clock
-- per shard for every replica that writes this model).
local function now_us(v)
  local n = tonumber(v)
  if n and n > 0 then return n * 1000 end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- A packed list of fixed-width lowercase hex fields. One anchored match over the whole
-- string: writes must never store junk members. (Lookups check only the length: a chain
-- that is not hex matches nothing, and the full check would cost a third of a lookup.)
local function packed_ok(s, width)
  if #s % width ~= 0 then return false end
  return string.find(s, '^[0-9a-f]*$') ~= nil
end

local function valid_worker(w)
  return w ~= nil and #w > 0 and #w <= 256 and not string.find(w, '[|%s]')
end

-- PEXPIREAT that only ever extends a key's life (a new key gets its first expiry).
local function extend_expiry(key, at_us)
  local at = math.ceil(at_us / 1000)
  if redis.call('PEXPIREAT', key, at, 'GT') == 0 then
    redis.call('PEXPIREAT', key, at, 'NX')
  end
end

-- Chain heads. `<head prefix><block>` lists the workers that recorded a chain starting with
-- that block (what a lookup probes); `<head prefix>@<worker>` lists the heads one worker
-- recorded, scored like the head block's record. A chain's head scores highest of its blocks,
-- so once a trim or expiry has removed a worker's records up to some score, every head of
-- its at or below that score is dead: drop_heads removes them, which keeps head keys bounded
-- by the live records instead of by their TTL.
local function heads_key(head_prefix, worker) return head_prefix .. '@' .. worker end

local function add_head(head_prefix, worker, h, score)
  local hk = head_prefix .. h
  redis.call('ZADD', hk, 'GT', score, worker)
  extend_expiry(hk, score)
  local wk = heads_key(head_prefix, worker)
  redis.call('ZADD', wk, 'GT', score, h)
  extend_expiry(wk, score)
end

-- Drop `worker` from every head it recorded with a score up to `bound` (a ZRANGEBYSCORE
-- bound: "(x" exclusive, "x" inclusive, "+inf" all).
local function drop_heads(head_prefix, worker, bound)
  local wk = heads_key(head_prefix, worker)
  local dead = redis.call('ZRANGEBYSCORE', wk, '-inf', bound)
  for _, h in ipairs(dead) do redis.call('ZREM', head_prefix .. h, worker) end
  if #dead > 0 then redis.call('ZREMRANGEBYSCORE', wk, '-inf', bound) end
end

-- Split a packed string of fixed-width fields into a Lua list.
local function unpack_fixed(s, width)
  local out = {}
  for i = 1, #s, width do
    out[#out + 1] = string.sub(s, i, i + width - 1)
  end
  return out
end

-- What a record writes besides its blocks' scores, once they are in the worker's set: the
-- sets' expiry (records and last accesses), the worker's latest valid-until (`top`, the highest score written), the
-- chain's head entry when `head_prefix` is given, and the removal of holes the chain fills.
-- `blocks` is the chain head first: a Lua list of hex keys, or the packed hex string (split
-- only when the worker has holes).
local function finish_record(wrk_key, cut_key, workers_key, head_prefix, worker, blocks, top,
                             lru_key)
  extend_expiry(wrk_key, top)
  extend_expiry(lru_key, top)
  redis.call('ZADD', workers_key, 'GT', top, worker)
  extend_expiry(workers_key, top)
  if head_prefix then
    local head = type(blocks) == 'string' and string.sub(blocks, 1, 16) or blocks[1]
    add_head(head_prefix, worker, head, top)
  end
  if redis.call('EXISTS', cut_key) == 1 then
    if type(blocks) == 'string' then blocks = unpack_fixed(blocks, 16) end
    batches(blocks, 1, 'ZREM', cut_key)
  end
end

-- Record `hexes` (a Lua list of block hex keys) for `worker`, block i (from 1) valid until
-- now + ttl - (i - 1) and last accessed at now - (i - 1) (now and ttl in us), then finish the
-- record (no head entry: the caller adds its own). ZADD GT: a score never moves backwards, so
-- a racing writer that gave a block a longer life or a later access keeps it. Returns added,
-- refreshed. (Routers' records do the ZADDs as plain commands instead: see record_chain.)
local function record_blocks(wrk_key, cut_key, workers_key, worker, hexes, now, ttl, lru_key)
  local n = #hexes
  if n == 0 then return 0, 0 end
  local before = redis.call('ZCARD', wrk_key)
  local until_, seen = {}, {}
  for k = 1, n do
    until_[2 * k - 1] = now + ttl - (k - 1)
    until_[2 * k] = hexes[k]
    seen[2 * k - 1] = now - (k - 1)
    seen[2 * k] = hexes[k]
  end
  local changed = batches(until_, 2, 'ZADD', wrk_key, {'GT', 'CH'})
  batches(seen, 2, 'ZADD', lru_key, {'GT', 'CH'})
  local added = redis.call('ZCARD', wrk_key) - before
  finish_record(wrk_key, cut_key, workers_key, nil, worker, hexes, now + ttl, lru_key)
  return added, changed - added
end

-- Mark `h` as a hole in its chain until the removed record would have expired, so lookups
-- cut the chain there even though deeper blocks remain recorded.
local function mark_hole(cut_key, h, until_ms)
  redis.call('ZADD', cut_key, until_ms, h)
  extend_expiry(cut_key, until_ms)
end

-- Drop the worker's records (holes, heads, last accesses) whose time has passed. Returns how
-- many records.
local function expire_records(wrk_key, cut_key, now, head_prefix, worker, lru_key)
  redis.call('ZREMRANGEBYSCORE', cut_key, '-inf', '(' .. now)
  drop_heads(head_prefix, worker, '(' .. now)
  local dead = redis.call('ZRANGEBYSCORE', wrk_key, '-inf', '(' .. now)
  if #dead == 0 then return 0 end
  batches(dead, 1, 'ZREM', lru_key)
  return batches(dead, 1, 'ZREM', wrk_key)
end

-- Drop `worker`'s head entries for those of `hexes` (a Lua list) that head a chain it recorded.
local function drop_heads_of(head_prefix, worker, hexes)
  local wk = heads_key(head_prefix, worker)
  local _, scores = batches(hexes, 1, 'ZMSCORE', wk)
  local gone = {}
  for i = 1, #hexes do
    if scores[i] then
      gone[#gone + 1] = hexes[i]
      redis.call('ZREM', head_prefix .. hexes[i], worker)
    end
  end
  batches(gone, 1, 'ZREM', wk)
end

-- Trim the worker to `capacity` blocks (0 = no limit), least recently accessed first (the lru
-- set), whatever source wrote the records and whatever their remaining lives, at most `limit`
-- in one call so a shrunken capacity cannot stall Redis; a trimmed block that heads a chain
-- loses its head entry. Records without a last access (written before the lru set existed)
-- are trimmed after the lru set runs dry, lowest valid-until first. Returns how many records.
local function trim_to_capacity(wrk_key, capacity, limit, head_prefix, worker, lru_key)
  if capacity == 0 then return 0 end
  local over = redis.call('ZCARD', wrk_key) - capacity
  if over <= 0 then return 0 end
  if over > limit then over = limit end
  local victims = redis.call('ZRANGE', lru_key, 0, over - 1)
  local removed = 0
  if #victims > 0 then
    redis.call('ZREMRANGEBYRANK', lru_key, 0, #victims - 1)
    removed = batches(victims, 1, 'ZREM', wrk_key)
    drop_heads_of(head_prefix, worker, victims)
  end
  if removed < over then
    local rest = redis.call('ZRANGE', wrk_key, 0, over - removed - 1)
    batches(rest, 1, 'ZREM', wrk_key)
    drop_heads_of(head_prefix, worker, rest)
    removed = removed + #rest
  end
  return removed
end

-- Drop every head a worker recorded (clearing the worker).
local function clear_heads(head_prefix, worker)
  drop_heads(head_prefix, worker, '+inf')
  redis.call('UNLINK', heads_key(head_prefix, worker))
end
