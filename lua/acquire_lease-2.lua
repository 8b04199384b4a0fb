#!lua
--[[
acquire_lease: count one in-flight request and its prefill tokens against a worker, shared by
every router replica. The lease expires if the router that took it dies mid-request; expired
leases are reaped here (a bounded number per call) and their load given back.

KEYS[1]  lease ZSET  "kvr:{m}:lease"  member "<worker>|<lease id>|<prefill tokens>" -> expiry us
KEYS[2]  load HASH   "kvr:{m}:load"   "<worker>" -> requests, "<worker>|pf" -> prefill tokens
ARGV[1]  worker id
ARGV[2]  lease id, unique per request ([0-9A-Za-z_-], at most 64 characters)
ARGV[3]  prefill tokens this request adds to the worker's queue (>= 0)
ARGV[4]  lease ttl, ms (> 0): longer than the longest request you expect
ARGV[5]  now, ms since the epoch (0 = the Redis server clock)
ARGV[6]  "all" to also return the whole load hash (a reservation: the router re-scores with
         it), else absent or ""

Returns  {requests, prefill tokens} of the worker after this lease, the number reaped, and
         with ARGV[6] = "all" the HGETALL of the load hash as a 4th element
Errors   KVR -1 worker | -3 <argument name>

Taking a lease that exists already (the same worker, id and prefill tokens) counts nothing
again: it only sets the lease's expiry to now + ttl. A router reserves a lease with a short ttl
when it re-checks a decision against the other replicas' leases, and the request's dispatch
then takes the same lease with the full ttl (or the reservation expires by itself).
]]

local lease_key, load_key = KEYS[1], KEYS[2]
local worker, lease_id = ARGV[1], ARGV[2]
if not valid_worker(worker) then return fail(-1, 'worker', 'empty, too long, or has "|" or whitespace') end
if not lease_id or #lease_id == 0 or #lease_id > 64 or string.find(lease_id, '[^%w_-]') then
  return fail(-3, 'lease_id', 'must be 1-64 characters of [0-9A-Za-z_-]')
end
local pf = int_arg(ARGV[3], 0)
if not pf then return fail(-3, 'prefill_tokens', 'must be an integer >= 0') end
local ttl = int_arg(ARGV[4], 1)
if not ttl then return fail(-3, 'ttl', 'must be a positive integer (ms)') end
if ARGV[5] ~= '0' and not int_arg(ARGV[5], 1) then return fail(-3, 'now', 'must be an integer >= 0 (ms)') end
local now = now_us(ARGV[5])
local report = ARGV[6] or ''
if report ~= '' and report ~= 'all' then return fail(-3, 'report', 'must be "all" or empty') end

local function give_back(member)
  local w, _, p = string.match(member, '^(.-)|(.-)|(%d+)$')
  if w then
    if redis.call('HINCRBY', load_key, w, -1) <= 0 then redis.call('HDEL', load_key, w) end
    if redis.call('HINCRBY', load_key, w .. '|pf', -tonumber(p)) <= 0 then
      redis.call('HDEL', load_key, w .. '|pf')
    end
  end
end

local stale = redis.call('ZRANGEBYSCORE', lease_key, '-inf', '(' .. now, 'LIMIT', 0, 100)
for _, m in ipairs(stale) do
  redis.call('ZREM', lease_key, m)
  give_back(m)
end

local member = worker .. '|' .. lease_id .. '|' .. pf
if redis.call('ZADD', lease_key, 'NX', now + ttl * 1000, member) == 1 then
  redis.call('HINCRBY', load_key, worker, 1)
  if pf > 0 then redis.call('HINCRBY', load_key, worker .. '|pf', pf) end
else
  redis.call('ZADD', lease_key, 'XX', now + ttl * 1000, member)
end
local reqs = tonumber(redis.call('HGET', load_key, worker) or '0')
local pft = tonumber(redis.call('HGET', load_key, worker .. '|pf') or '0')
if report == 'all' then return {reqs, pft, #stale, redis.call('HGETALL', load_key)} end
return {reqs, pft, #stale}
