#!lua
--[[
apply_engine_events: apply a run of one worker's engine KV events (BlockStored, BlockRemoved,
AllBlocksCleared, resyncs) for one model, in event order, atomically with the stream position
they bring the index to. The eviction listener's write path: one call per worker and model
per flush, however many events and batches the flush holds.

Same effects as store_engine_blocks / release_engine_blocks / clear_worker called one event
at a time, computed on Lua tables (the engine map is read once with HMGET and written once
with HSET / HDEL, children counts and scores settled in memory), plus:
  * Chain order: a block's valid-until and last access are capped 1 us below its parent's,
    so a chain whose blocks were announced at different times still expires and is trimmed
    tail first (prefix property). A stored block's last access is now (minus 1 us per block
    stored before it in the call).
    A block whose parent's record is already dead gets no record (only its map entry).
  * Stream position and fencing: KEYS[6] holds "<epoch>:<seq>" per worker. A call whose
    epoch is lower than the stored one comes from a listener that lost the worker: it is
    refused whole (-1). A call whose seq is not above the stored seq under the same epoch was
    applied already (a retry after an unknown outcome): it is skipped (0), unless its ops
    start with C, which resets the stream (a clear is idempotent).
  * Sub-batches (ARGV[10..12]): a long run of ops is sent as several calls in turn, each
    saying where its ops start: `base`, the last batch fully applied before the run, and
    `offset`, how many of the run's ops earlier calls hold. A call that does not finish the
    run stores "<epoch>:<base>:<offset + its ops>": a partial position, kept by claim_worker.
    A call whose base is the stored seq skips the ops the stored offset says are applied
    already (all of them: status 0, nothing written), so a listener that crashed mid-run and
    one that takes over and replays the batches, grouped and cut however it likes, apply every
    op exactly once. The call that finishes the run (final = 1) stores "<epoch>:<seq>".

KEYS[1]  the worker's engine map  "kvr:{m}:emap:<worker>"
         HASH engine hex -> "<router key hex>:<parent engine hex or ->:<refs>:<children>"
KEYS[2]  the worker's records ZSET   "kvr:{m}:wrk:<worker>"
KEYS[3]  the worker's hole ZSET   "kvr:{m}:cut:<worker>"
KEYS[4]  workers ZSET             "kvr:{m}:workers"
KEYS[5]  head key prefix          "kvr:{m}:head:"
KEYS[6]  stream positions HASH    "kvr:{m}:lseq"   worker -> "<epoch>:<seq>" (or
         "<epoch>:<base>:<ops>", a run cut off part way: see Sub-batches)
KEYS[7]  the worker's last accesses "kvr:{m}:lru:<worker>"  block hex -> last access us
ARGV[1]  worker id
ARGV[2]  ops, one character each, in event order:
           R  store the first block of a chain   (fields: engine hash, router key)
           S  store a block after its parent     (fields: engine hash, parent engine hash,
                                                  router key)
           D  release one reference of a block   (fields: engine hash)
           C  clear everything the worker holds  (no fields)
ARGV[3]  fields: 16 lowercase hex digits each, back to back, in op order
ARGV[4]  now, ms since the epoch (0 = the Redis server clock)
ARGV[5]  ttl, ms (> 0): life of a confirmed record
ARGV[6]  capacity in blocks (0 = unlimited)
ARGV[7]  the most records to trim in this call (> 0)
ARGV[8]  epoch (>= 0): the caller's ownership fencing token (claim_worker-1 stores it)
ARGV[9]  seq (>= -1): the last engine batch these ops cover; -1 = no resume point (the stream
         was reset and nothing since)
ARGV[10] base (optional, >= -1): the stored seq the run of ops started from (absent: the call
         is a whole run, as before sub-batches)
ARGV[11] offset (>= 0, with base): ops of the run sent by earlier calls
ARGV[12] final ("1" or "0", with base): whether this call ends the run (then seq is stored)

Returns  {status, stored, duplicates, released, removed, unknown, holes, clears, added,
          refreshed, evicted, expired}
         status 1 = applied, 0 = already applied (nothing written), -1 = fenced (nothing
         written: another listener owns the worker now)
Errors   KVR -1 worker | -2 fields | -3 <argument name>
]]

local emap_key, wrk_key, cut_key, workers_key, head_prefix, lseq_key, lru_key =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local worker, ops, fields = ARGV[1], ARGV[2], ARGV[3]
if not valid_worker(worker) then return fail(-1, 'worker', 'empty, too long, or has "|" or whitespace') end
if string.find(ops, '[^RSDC]') then return fail(-3, 'ops', 'must be characters R, S, D or C') end
if not packed_ok(fields, 16) then return fail(-2, 'fields', 'expected 16 lowercase hex digits per field') end
local _, n_r = string.gsub(ops, 'R', '')
local _, n_s = string.gsub(ops, 'S', '')
local _, n_d = string.gsub(ops, 'D', '')
if #fields ~= 16 * (2 * n_r + 3 * n_s + n_d) then
  return fail(-2, 'fields', 'count does not match the ops (R 2, S 3, D 1, C 0)')
end
if ARGV[4] ~= '0' and not int_arg(ARGV[4], 1) then return fail(-3, 'now', 'must be an integer >= 0 (ms)') end
local ttl = int_arg(ARGV[5], 1)
if not ttl then return fail(-3, 'ttl', 'must be a positive integer (ms)') end
local capacity = int_arg(ARGV[6], 0)
if not capacity then return fail(-3, 'capacity', 'must be an integer >= 0 (blocks)') end
local limit = int_arg(ARGV[7], 1)
if not limit then return fail(-3, 'limit', 'must be a positive integer') end
local epoch = int_arg(ARGV[8], 0)
if not epoch then return fail(-3, 'epoch', 'must be an integer >= 0') end
local seq = int_arg(ARGV[9], -1)
if not seq then return fail(-3, 'seq', 'must be an integer >= -1') end
local base, offset, final = nil, 0, true
if ARGV[10] then
  base = int_arg(ARGV[10], -1)
  if not base then return fail(-3, 'base', 'must be an integer >= -1') end
  offset = int_arg(ARGV[11], 0)
  if not offset then return fail(-3, 'offset', 'must be an integer >= 0') end
  if ARGV[12] ~= '0' and ARGV[12] ~= '1' then return fail(-3, 'final', 'must be 0 or 1') end
  final = ARGV[12] == '1'
end
local now = now_us(ARGV[4])
ttl = ttl * 1000
local run_ops = #ops

local cur = redis.call('HGET', lseq_key, worker)
if cur then
  local ce, cs, co = string.match(cur, '^(%d+):(%-?%d+):?(%d*)$')
  if ce then
    ce, cs, co = tonumber(ce), tonumber(cs), tonumber(co) or -1
    if ce > epoch then return {-1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0} end
    if ce == epoch and co >= 0 and base == cs then
      -- A partial position on this call's base: skip the ops an earlier call applied (a
      -- clear among them too: it is a replay, not a new stream).
      if co > offset then
        local skip = co - offset
        if skip >= #ops then return {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0} end
        local nf = 0
        for i = 1, skip do
          local c = string.byte(ops, i)
          nf = nf + (c == 82 and 2 or c == 83 and 3 or c == 68 and 1 or 0)
        end
        ops = string.sub(ops, skip + 1)
        fields = string.sub(fields, 16 * nf + 1)
      end
    elseif ce == epoch and cs >= seq and string.sub(ops, 1, 1) ~= 'C' then
      return {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
    end
  end
end

local expired = expire_records(wrk_key, cut_key, now, head_prefix, worker, lru_key)

-- Parse the ops. Everything referenced before the first clear is read from Redis up front;
-- after a clear the state is empty and lives in the tables alone.
local n = #ops
local o_eh, o_ph, o_rk = {}, {}, {}
local want, want_list = {}, {}
local function want_hash(h)
  if not want[h] then want[h] = true; want_list[#want_list + 1] = h end
end
local pre_clear = true
local pos = 1
for i = 1, n do
  local c = string.byte(ops, i)
  if c == 82 then      -- R
    o_eh[i] = string.sub(fields, pos, pos + 15)
    o_rk[i] = string.sub(fields, pos + 16, pos + 31)
    pos = pos + 32
    if pre_clear then want_hash(o_eh[i]) end
  elseif c == 83 then  -- S
    o_eh[i] = string.sub(fields, pos, pos + 15)
    o_ph[i] = string.sub(fields, pos + 16, pos + 31)
    o_rk[i] = string.sub(fields, pos + 32, pos + 47)
    pos = pos + 48
    if pre_clear then want_hash(o_eh[i]); want_hash(o_ph[i]) end
  elseif c == 68 then  -- D
    o_eh[i] = string.sub(fields, pos, pos + 15)
    pos = pos + 16
    if pre_clear then want_hash(o_eh[i]) end
  else                 -- C
    pre_clear = false
  end
end

local ENTRY = '^(%x+):([%x-]*):(%d+):(%d+)$'
local E = {}        -- engine hex -> {rk, parent, refs, kids} | false (absent)
local dirty = {}    -- engine hexes whose entry must be written back (or deleted)
local function load_entries(list)
  local _, vs = batches(list, 1, 'HMGET', emap_key)
  for k = 1, #list do
    local v = vs[k]
    local e = false
    if v then
      local rk, parent, refs, kids = string.match(v, ENTRY)
      if rk then
        e = {rk, parent, tonumber(refs), tonumber(kids)}
      else
        dirty[list[k]] = true  -- malformed: delete it
      end
    end
    E[list[k]] = e
  end
end
load_entries(want_list)

-- Released blocks (before the first clear) touch their parents' children counts, and
-- released or parent blocks need their records' current scores.
local more, Z, LZ, want_rk = {}, {}, {}, {}
local rk_list = {}
pre_clear = true
for i = 1, n do
  local c = string.byte(ops, i)
  if c == 67 then break end
  local e = E[o_eh[i]]
  if c == 68 and e then
    if e[2] ~= '-' and E[e[2]] == nil and not want[e[2]] then
      want[e[2]] = true
      more[#more + 1] = e[2]
    end
    if not want_rk[e[1]] then want_rk[e[1]] = true; rk_list[#rk_list + 1] = e[1] end
  elseif c == 83 then
    local pe = E[o_ph[i]]
    if pe and not want_rk[pe[1]] then want_rk[pe[1]] = true; rk_list[#rk_list + 1] = pe[1] end
  end
end
load_entries(more)
local _, scores = batches(rk_list, 1, 'ZMSCORE', wrk_key)
local _, seen_at = batches(rk_list, 1, 'ZMSCORE', lru_key)
for k = 1, #rk_list do
  local s, a = scores[k], seen_at[k]
  Z[rk_list[k]] = s and tonumber(s) or false
  LZ[rk_list[k]] = a and tonumber(a) or false
end

local R = {}        -- router hex -> new score | false (record removed)
local L = {}        -- router hex -> new last access (us), for every recorded R entry
local holes_at = {} -- router hex -> hole until (us)
local restored = {} -- router hexes recorded again (no longer holes)
local heads = {}    -- router hex -> score, for chain heads
local cleared = false
local stored, dups, released, removed, unknown, holes, clears = 0, 0, 0, 0, 0, 0, 0
local k = 0

local function score_of(rk)
  local v = R[rk]
  if v == nil then v = Z[rk] end
  if v then return v end
  return nil
end

local function access_of(rk)
  local v = L[rk]
  if v == nil then v = LZ[rk] end
  if v then return v end
  return nil
end

for i = 1, n do
  local c = string.byte(ops, i)
  if c == 82 or c == 83 then
    local eh, rk = o_eh[i], o_rk[i]
    local e = E[eh]
    if e then
      e[3] = e[3] + 1
      dups = dups + 1
      rk = e[1]
    else
      local parent = '-'
      if c == 83 then
        parent = o_ph[i]
        local pe = E[parent]
        if pe then pe[4] = pe[4] + 1; dirty[parent] = true end
      end
      e = {rk, parent, 1, 0}
      E[eh] = e
      stored = stored + 1
    end
    dirty[eh] = true
    local s = now + ttl - k
    local a = now - k
    k = k + 1
    if e[2] ~= '-' then
      local pe = E[e[2]]
      if pe then
        local ps = score_of(pe[1])
        if ps and ps - 1 < s then s = ps - 1 end
        local pa = access_of(pe[1])
        if pa and pa - 1 < a then a = pa - 1 end
      end
    end
    if s >= now then
      local old = R[rk]
      if not old or old < s then R[rk] = s end
      local olda = L[rk]
      if not olda or olda < a then L[rk] = a end
      holes_at[rk] = nil
      restored[rk] = true
      if c == 82 then heads[rk] = s end
    end
  elseif c == 68 then
    local eh = o_eh[i]
    local e = E[eh]
    if not e then
      unknown = unknown + 1
    else
      released = released + 1
      dirty[eh] = true
      if e[3] > 1 then
        e[3] = e[3] - 1
      else
        E[eh] = false
        if e[2] ~= '-' then
          local pe = E[e[2]]
          if pe then
            pe[4] = math.max(pe[4] - 1, 0)
            dirty[e[2]] = true
          end
        end
        local s = score_of(e[1])
        if s then
          R[e[1]] = false
          removed = removed + 1
          if e[4] > 0 and s >= now then
            holes_at[e[1]] = s
            holes = holes + 1
          end
        end
      end
    end
  else
    -- C: drop everything; what follows starts from an empty worker.
    clears = clears + 1
    cleared = true
    E, Z, R, dirty, holes_at, restored, heads = {}, {}, {}, {}, {}, {}, {}
    L, LZ = {}, {}
  end
end

-- Write back.
if cleared then
  redis.call('UNLINK', wrk_key, cut_key, emap_key, lru_key)
  clear_heads(head_prefix, worker)
  redis.call('ZREM', workers_key, worker)
end

local hset, hdel = {}, {}
for h in pairs(dirty) do
  local e = E[h]
  if e then
    hset[#hset + 1] = h
    hset[#hset + 1] = e[1] .. ':' .. e[2] .. ':' .. e[3] .. ':' .. e[4]
  else
    hdel[#hdel + 1] = h
  end
end
batches(hdel, 1, 'HDEL', emap_key)
batches(hset, 2, 'HSET', emap_key)
if #hset > 0 then extend_expiry(emap_key, now + ttl) end

local zrem, zadd, lru = {}, {}, {}
local max_score = 0
for rk, s in pairs(R) do
  if s then
    zadd[#zadd + 1] = s
    zadd[#zadd + 1] = rk
    lru[#lru + 1] = L[rk]
    lru[#lru + 1] = rk
    if s > max_score then max_score = s end
  else
    zrem[#zrem + 1] = rk
  end
end
batches(zrem, 1, 'ZREM', wrk_key)
batches(zrem, 1, 'ZREM', lru_key)
local added, changed = 0, 0
if #zadd > 0 then
  local before = redis.call('ZCARD', wrk_key)
  changed = batches(zadd, 2, 'ZADD', wrk_key, {'GT', 'CH'})
  batches(lru, 2, 'ZADD', lru_key, {'GT', 'CH'})
  added = redis.call('ZCARD', wrk_key) - before
  extend_expiry(wrk_key, max_score)
  extend_expiry(lru_key, max_score)
  redis.call('ZADD', workers_key, 'GT', max_score, worker)
  extend_expiry(workers_key, max_score)
end

-- Blocks recorded again are no longer holes; then the holes this call made.
if next(restored) ~= nil and redis.call('EXISTS', cut_key) == 1 then
  local list = {}
  for rk in pairs(restored) do list[#list + 1] = rk end
  batches(list, 1, 'ZREM', cut_key)
end
for rk, s in pairs(holes_at) do mark_hole(cut_key, rk, s) end
for rk, s in pairs(heads) do
  if R[rk] then
    add_head(head_prefix, worker, rk, R[rk])
  end
end

if final then
  redis.call('HSET', lseq_key, worker, epoch .. ':' .. seq)
else
  redis.call('HSET', lseq_key, worker, epoch .. ':' .. base .. ':' .. (offset + run_ops))
end
extend_expiry(lseq_key, now + ttl)
local evicted = trim_to_capacity(wrk_key, capacity, limit, head_prefix, worker, lru_key)
return {1, stored, dups, released, removed, unknown, holes, clears, added, changed - added,
        evicted, expired}
