#!lua
--[[
take_token: take one request's token from a client's token bucket, shared by every router
replica (the request rate limit at the edge). The bucket holds up to `burst` tokens and
refills at `rate` tokens per second; a request that finds less than one token is refused and
told how long until one is there. Time is the Redis server's clock, so replicas whose clocks
disagree still share one bucket.

KEYS[1]  bucket HASH  "kvr:rl:{<client>}"  fields: tok (tokens, a float), ts (last update, us)
ARGV[1]  rate: tokens added per second (a number > 0, fractions allowed)
ARGV[2]  burst: bucket size in tokens (an integer >= 1)
ARGV[3]  now in ms (0 = the server clock)

Returns  {1, 0} when the request may go, {0, retry_after_ms} when it may not
         (retry_after_ms >= 1: when the bucket will hold one token again)
Errors   KVR -3 <argument name>
]]

local bucket = KEYS[1]
local rate = tonumber(ARGV[1])
if rate == nil or rate <= 0 or rate ~= rate or rate == math.huge then
  return fail(-3, 'rate', 'must be a number > 0')
end
local burst = int_arg(ARGV[2], 1)
if not burst then return fail(-3, 'burst', 'must be an integer >= 1') end
local now = now_us(ARGV[3])

local state = redis.call('HMGET', bucket, 'tok', 'ts')
local tokens, last = tonumber(state[1]), tonumber(state[2])
if tokens == nil or last == nil then
  tokens, last = burst, now
end
-- A clock that went backwards (failover to a replica) refills nothing rather than draining.
local elapsed = math.max(0, now - last)
tokens = math.min(burst, tokens + elapsed * rate / 1000000)

local allowed, wait_ms = 0, 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  wait_ms = math.max(1, math.ceil((1 - tokens) * 1000 / rate))
end
redis.call('HSET', bucket, 'tok', string.format('%.6f', tokens), 'ts', string.format('%d', now))
-- A full bucket is the same as no key: let it go once it would have refilled.
redis.call('PEXPIRE', bucket, math.ceil((burst - tokens) * 1000 / rate) + 1000)
return {allowed, wait_ms}
