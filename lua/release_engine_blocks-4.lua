#!lua
--[[
release_engine_blocks: apply engine BlockRemoved events for one worker. Each engine hash drops
one reference; at zero the mapping goes, its parent loses a child, and the router key's record
is removed. A block removed while it still has recorded children becomes a hole, so lookups
stop matching there.

KEYS[1]  the worker's engine map  "kvr:{m}:emap:<worker>"
KEYS[2]  the worker's records ZSET   "kvr:{m}:wrk:<worker>"
KEYS[3]  the worker's hole ZSET   "kvr:{m}:cut:<worker>"
KEYS[4]  the worker's last accesses "kvr:{m}:lru:<worker>"
ARGV[1]  worker id
ARGV[2]  engine hashes: 16 lowercase hex digits each, back to back, in event order
ARGV[3]  now, ms since the epoch (0 = the Redis server clock)

Returns  {released, removed, unknown, holes}
Errors   KVR -1 worker | -2 blocks | -3 now
]]

local emap_key, wrk_key, cut_key, lru_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local worker, blocks = ARGV[1], ARGV[2]
if not valid_worker(worker) then return fail(-1, 'worker', 'empty, too long, or has "|" or whitespace') end
if not packed_ok(blocks, 16) then return fail(-2, 'blocks', 'expected 16 lowercase hex digits per block') end
if ARGV[3] ~= '0' and not int_arg(ARGV[3], 1) then return fail(-3, 'now', 'must be an integer >= 0 (ms)') end
local now = now_us(ARGV[3])

local ENTRY = '^(%x+):([%x-]*):(%d+):(%d+)$'
local released, removed, unknown, holes = 0, 0, 0, 0
for i = 1, #blocks, 16 do
  local eh = string.sub(blocks, i, i + 15)
  local v = redis.call('HGET', emap_key, eh)
  local rk, parent, refs, kids
  if v then rk, parent, refs, kids = string.match(v, ENTRY) end
  if not rk then
    unknown = unknown + 1
    if v then redis.call('HDEL', emap_key, eh) end
  else
    released = released + 1
    refs, kids = tonumber(refs), tonumber(kids)
    if refs > 1 then
      redis.call('HSET', emap_key, eh, rk .. ':' .. parent .. ':' .. (refs - 1) .. ':' .. kids)
    else
      redis.call('HDEL', emap_key, eh)
      if parent ~= '-' then
        local pv = redis.call('HGET', emap_key, parent)
        local a, b, c, d
        if pv then a, b, c, d = string.match(pv, ENTRY) end
        if a then
          local nd = math.max(tonumber(d) - 1, 0)
          redis.call('HSET', emap_key, parent, a .. ':' .. b .. ':' .. c .. ':' .. nd)
        end
      end
      local old = redis.call('ZSCORE', wrk_key, rk)
      if old then
        redis.call('ZREM', wrk_key, rk)
        redis.call('ZREM', lru_key, rk)
        removed = removed + 1
        if kids > 0 and tonumber(old) >= now then
          mark_hole(cut_key, rk, tonumber(old))
          holes = holes + 1
        end
      end
    end
  end
end
return {released, removed, unknown, holes}
