#!lua
--[[
store_tier_blocks: apply one worker's stores and removals on a lower storage tier (blocks the
engine offloaded to CPU memory, disk, ...: vLLM's BlockStored/BlockRemoved with a medium other
than GPU), in event order. The tier's records live apart from the worker's GPU records, so a
removal on the tier never touches what the GPU holds, and a GPU eviction leaves the tier copy.

KEYS[1]  the worker's tier ZSET     "kvr:{m}:tier:<medium>|<worker>"   block hex -> valid-until us
KEYS[2]  the worker's tier map      "kvr:{m}:tmap:<medium>|<worker>"   engine hex -> block hex
KEYS[3]  the tier's workers ZSET    "kvr:{m}:tiers:<medium>"           worker -> valid-until us
ARGV[1]  worker id
ARGV[2]  ops, one letter each: S (store: 2 fields, engine hash and block key),
         D (remove: 1 field, engine hash) or C (clear the worker's tier: no field; the
         listener sends it when it lost events and cannot know what the tier still holds)
ARGV[3]  fields: 16 lowercase hex digits each, back to back, in op order
ARGV[4]  now, ms since the epoch (0 = the Redis server clock)
ARGV[5]  ttl, ms (> 0): how long a stored block stays live without news
ARGV[6]  capacity: most blocks kept on this tier for the worker (0 = no bound)

Returns  {stored, removed, unknown, trimmed}
Errors   KVR -1 worker | -2 fields | -3 <argument name>

Records on one tier are all written by engine events with one TTL, so valid-until order is
last-store order and capacity trimming drops the least recently stored blocks. The map keeps
the engine hash of each stored block; a trimmed block's map entry stays until its removal
event or the map's expiry (it only maps a hash to a key no longer recorded). Applying the same
ops twice gives the same state (stores are ZADD GT, removals are idempotent), so a retried
round trip is harmless.
]]

local tier_key, map_key, workers_key = KEYS[1], KEYS[2], KEYS[3]
local worker, ops, fields = ARGV[1], ARGV[2], ARGV[3]
if not valid_worker(worker) then return fail(-1, 'worker', 'empty, too long, or has "|" or whitespace') end
if not string.find(ops, '^[SDC]*$') then return fail(-3, 'ops', 'expected letters S, D and C') end
if not packed_ok(fields, 16) then return fail(-2, 'fields', 'expected 16 lowercase hex digits per field') end
local need = 0
local per_op = {S = 2, D = 1, C = 0}
for i = 1, #ops do need = need + per_op[string.sub(ops, i, i)] end
if need * 16 ~= #fields then return fail(-2, 'fields', 'count does not match the ops') end
if ARGV[4] ~= '0' and not int_arg(ARGV[4], 1) then return fail(-3, 'now', 'must be an integer >= 0 (ms)') end
local ttl = int_arg(ARGV[5], 1)
if not ttl then return fail(-3, 'ttl', 'must be an integer > 0 (ms)') end
local capacity = int_arg(ARGV[6], 0)
if not capacity then return fail(-3, 'capacity', 'must be an integer >= 0') end
local now = now_us(ARGV[4])
local until_us = now + ttl * 1000

local stored, removed, unknown, trimmed = 0, 0, 0, 0
local pos = 1
local function field()
  local f = string.sub(fields, pos, pos + 15)
  pos = pos + 16
  return f
end
-- Each stored block is 1 us older than the one before it in the call, as in the GPU sets: a
-- chain offloaded in one batch keeps its head newest, so trimming cuts its tail first.
local step = 0
for i = 1, #ops do
  if string.sub(ops, i, i) == 'S' then
    local eh, key = field(), field()
    redis.call('ZADD', tier_key, 'GT', until_us - step, key)
    redis.call('HSET', map_key, eh, key)
    step = step + 1
    stored = stored + 1
  elseif string.sub(ops, i, i) == 'C' then
    removed = removed + redis.call('ZCARD', tier_key)
    redis.call('DEL', tier_key, map_key)
  else
    local eh = field()
    local key = redis.call('HGET', map_key, eh)
    if key then
      removed = removed + redis.call('ZREM', tier_key, key)
      redis.call('HDEL', map_key, eh)
    else
      unknown = unknown + 1
    end
  end
end
redis.call('ZREMRANGEBYSCORE', tier_key, '-inf', '(' .. now)
if capacity > 0 then
  local over = redis.call('ZCARD', tier_key) - capacity
  if over > 0 then
    trimmed = redis.call('ZREMRANGEBYRANK', tier_key, 0, over - 1)
  end
end
if stored > 0 then
  extend_expiry(tier_key, until_us)
  extend_expiry(map_key, until_us)
  redis.call('ZADD', workers_key, 'GT', until_us, worker)
  extend_expiry(workers_key, until_us)
end
if redis.call('EXISTS', tier_key) == 0 then
  redis.call('DEL', map_key)
  redis.call('ZREM', workers_key, worker)
end
return {stored, removed, unknown, trimmed}
