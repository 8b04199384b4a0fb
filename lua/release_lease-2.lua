#!lua
--[[
release_lease: give back a lease taken by acquire_lease, wholly (the request ended) or only its
prefill tokens (the first token arrived: the worker is done prefilling it, it still decodes).
Releasing a lease that expired or was already released changes nothing.

KEYS[1]  lease ZSET  "kvr:{m}:lease"
KEYS[2]  load HASH   "kvr:{m}:load"
ARGV[1]  worker id
ARGV[2]  lease id
ARGV[3]  prefill tokens the lease was taken with (>= 0)
ARGV[4]  "end" (release wholly) or "prefilled" (keep the request, drop its prefill tokens)

Returns  1 if the lease was held, 0 if not
Errors   KVR -1 worker | -3 <argument name>
]]

local lease_key, load_key = KEYS[1], KEYS[2]
local worker, lease_id = ARGV[1], ARGV[2]
if not valid_worker(worker) then return fail(-1, 'worker', 'empty, too long, or has "|" or whitespace') end
if not lease_id or #lease_id == 0 or #lease_id > 64 or string.find(lease_id, '[^%w_-]') then
  return fail(-3, 'lease_id', 'must be 1-64 characters of [0-9A-Za-z_-]')
end
local pf = int_arg(ARGV[3], 0)
if not pf then return fail(-3, 'prefill_tokens', 'must be an integer >= 0') end
local mode = ARGV[4]
if mode ~= 'end' and mode ~= 'prefilled' then return fail(-3, 'mode', 'must be "end" or "prefilled"') end

local member = worker .. '|' .. lease_id .. '|' .. pf
local score = redis.call('ZSCORE', lease_key, member)
if not score then return 0 end
redis.call('ZREM', lease_key, member)
if pf > 0 and redis.call('HINCRBY', load_key, worker .. '|pf', -pf) <= 0 then
  redis.call('HDEL', load_key, worker .. '|pf')
end
if mode == 'prefilled' then
  redis.call('ZADD', lease_key, score, worker .. '|' .. lease_id .. '|0')
elseif redis.call('HINCRBY', load_key, worker, -1) <= 0 then
  redis.call('HDEL', load_key, worker)
end
return 1
