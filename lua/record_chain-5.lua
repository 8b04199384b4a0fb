#!lua
--[[
record_chain: finish recording that one worker holds a chain of blocks. The caller
(ResidencyIndex.record_call) sends, on one connection and in this order: ZCARD of the worker's
set, one plain `ZADD <wrk> GT CH` of the whole chain's valid-until scores, one plain
`ZADD <lru> GT` of its last accesses (Redis parses the scores and members
natively: no Lua argument conversion for thousands of blocks), then this script, which adds
what the ZADD cannot: the chain's head entry, the worker's latest valid-until, key expiries,
removal of holes the chain fills, expiry of dead records, and the trim to capacity. Used by
routers at dispatch (speculative: a short life) and by the listener for notices naming router
keys.

KEYS[1]  the worker's records ZSET  "kvr:{m}:wrk:<worker>"   block hex -> valid-until us
KEYS[2]  the worker's hole ZSET  "kvr:{m}:cut:<worker>"
KEYS[3]  workers ZSET            "kvr:{m}:workers"        worker -> latest valid-until us
KEYS[4]  head key prefix         "kvr:{m}:head:"          (ZSET per chain head block; the
         worker's own heads in KEYS[4] .. "@" .. worker)
KEYS[5]  the worker's last accesses "kvr:{m}:lru:<worker>"   block hex -> last access us (the
         caller's second plain `ZADD <lru> GT` wrote this chain's accesses: now - i for block i)
ARGV[1]  worker id
ARGV[2]  the chain from its first block: 16 lowercase hex digits per block, back to back
         (may be empty: then only expiry and trim run)
ARGV[3]  now, us since the epoch (the scores the ZADD wrote were computed from it)
ARGV[4]  the highest score the ZADD wrote (us), the head's and the worker's valid-until
ARGV[5]  capacity in blocks (0 = unlimited)
ARGV[6]  the most records to trim in this call (> 0)

Returns  {members, evicted, expired}: the set's size after the ZADD (before expiry and trim),
         and how many records the trim and the expiry removed
Errors   KVR -1 worker | -2 chain | -3 <numeric argument name>
]]

local wrk_key, cut_key, workers_key, head_prefix, lru_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local worker, chain = ARGV[1], ARGV[2]
if not valid_worker(worker) then return fail(-1, 'worker', 'empty, too long, or has "|" or whitespace') end
-- The length is checked, not the digits: on the dispatch path a full hex scan costs a tenth
-- of the call, and the ZADD before this script already stored these members.
if #chain % 16 ~= 0 then return fail(-2, 'chain', 'expected 16 lowercase hex digits per block') end
local now = int_arg(ARGV[3], 1)
if not now then return fail(-3, 'now', 'must be a positive integer (us)') end
local top = int_arg(ARGV[4], 0)
if not top or (#chain > 0 and top < now) then
  return fail(-3, 'top', 'must be an integer >= now (us)')
end
local capacity = int_arg(ARGV[5], 0)
if not capacity then return fail(-3, 'capacity', 'must be an integer >= 0 (blocks)') end
local limit = int_arg(ARGV[6], 1)
if not limit then return fail(-3, 'limit', 'must be a positive integer') end

local members = redis.call('ZCARD', wrk_key)
if #chain > 0 then
  finish_record(wrk_key, cut_key, workers_key, head_prefix, worker, chain, top, lru_key)
end
local expired = expire_records(wrk_key, cut_key, now, head_prefix, worker, lru_key)
local evicted = trim_to_capacity(wrk_key, capacity, limit, head_prefix, worker, lru_key)
return {members, evicted, expired}
