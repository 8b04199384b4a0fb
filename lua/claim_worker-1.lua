#!lua
--[[
claim_worker: a listener that just acquired a worker's ownership lease (own_worker-1) fences
the previous owner out of one model's slice and reads where the worker's event stream stands
there. After this call, apply_engine_events refuses every call with a lower epoch, so a
listener that lost the worker (paused, partitioned) can never write after the new owner has
read the position it resumes from.

KEYS[1]  stream positions HASH  "kvr:{m}:lseq"   worker -> "<epoch>:<seq>", or
         "<epoch>:<seq>:<ops>" after a run of ops was cut off part way (apply_engine_events-7)
ARGV[1]  worker id
ARGV[2]  epoch (>= 0): the fencing token own_worker-1 returned
ARGV[3]  ttl, ms (> 0): the key lives at least this long (the life of a confirmed record)

Returns  {status, seq}: status 1 = claimed, -1 = a newer epoch is stored (the caller lost the
         worker again; nothing written). seq = the last batch applied for the worker in this
         model, -1 when there is no resume point.
Errors   KVR -1 worker | -3 <argument name>
]]

local lseq_key = KEYS[1]
local worker = ARGV[1]
if not valid_worker(worker) then return fail(-1, 'worker', 'empty, too long, or has "|" or whitespace') end
local epoch = int_arg(ARGV[2], 0)
if not epoch then return fail(-3, 'epoch', 'must be an integer >= 0') end
local ttl = int_arg(ARGV[3], 1)
if not ttl then return fail(-3, 'ttl', 'must be a positive integer (ms)') end

local seq, part = -1, ''
local cur = redis.call('HGET', lseq_key, worker)
if cur then
  local ce, cs, co = string.match(cur, '^(%d+):(%-?%d+)(:?%d*)$')
  if ce then
    if tonumber(ce) > epoch then return {-1, tonumber(cs)} end
    seq, part = tonumber(cs), co
  end
end
-- A partial position (":<ops>", a run cut into sub-batches) is kept: the new owner replays
-- from seq and apply_engine_events skips the ops already applied.
redis.call('HSET', lseq_key, worker, epoch .. ':' .. seq .. part)
extend_expiry(lseq_key, now_us('0') + ttl * 1000)
return {1, seq}
