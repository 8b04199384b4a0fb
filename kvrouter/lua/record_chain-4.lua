#!lua
--[[
record_chain: record that one worker holds a chain of blocks, refresh their expiry, drop
expired records and trim the worker to its capacity (oldest first). Used by routers at
dispatch (speculative: a short ttl_new) and by the listener for notices naming router keys.

KEYS[1]  the worker's LRU ZSET   "kvr:{m}:wrk:<worker>"   block hex -> valid-until us
KEYS[2]  the worker's hole ZSET  "kvr:{m}:cut:<worker>"
KEYS[3]  workers ZSET            "kvr:{m}:workers"        worker -> latest valid-until us
KEYS[4]  head key prefix         "kvr:{m}:head:"          (ZSET per chain head block; the
         worker's own heads in KEYS[4] .. "@" .. worker)
ARGV[1]  worker id
ARGV[2]  the chain from its first block: 16 lowercase hex digits per block, back to back
ARGV[3]  now, ms since the epoch (0 = the Redis server clock)
ARGV[4]  ttl_new, ms (> 0): life of blocks past the held prefix
ARGV[5]  ttl_held, ms (>= 0; 0 = ttl_new): life of the first `held` blocks
ARGV[6]  held: how many leading blocks the caller saw the worker holding (>= 0)
ARGV[7]  capacity in blocks (0 = unlimited)
ARGV[8]  the most records to trim in this call (> 0)

Returns  {added, refreshed, evicted, expired}
Errors   KVR -1 worker | -2 chain | -3 <numeric argument name>
]]

local wrk_key, cut_key, workers_key, head_prefix = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local worker, chain = ARGV[1], ARGV[2]
if not valid_worker(worker) then return fail(-1, 'worker', 'empty, too long, or has "|" or whitespace') end
-- The length is checked, not the digits: on the dispatch path a full hex scan costs a tenth
-- of the call, the Python wrapper packs keys with array('Q') so they are always hex, and a
-- non-hex member could only sit unmatched until it expires.
if #chain % 16 ~= 0 then return fail(-2, 'chain', 'expected 16 lowercase hex digits per block') end
if ARGV[3] ~= '0' and not int_arg(ARGV[3], 1) then return fail(-3, 'now', 'must be an integer >= 0 (ms)') end
local ttl_new = int_arg(ARGV[4], 1)
if not ttl_new then return fail(-3, 'ttl_new', 'must be a positive integer (ms)') end
local ttl_held = int_arg(ARGV[5], 0)
if not ttl_held then return fail(-3, 'ttl_held', 'must be an integer >= 0 (ms)') end
if ttl_held == 0 then ttl_held = ttl_new end
local held = int_arg(ARGV[6], 0)
if not held then return fail(-3, 'held', 'must be an integer >= 0 (blocks)') end
local capacity = int_arg(ARGV[7], 0)
if not capacity then return fail(-3, 'capacity', 'must be an integer >= 0 (blocks)') end
local limit = int_arg(ARGV[8], 1)
if not limit then return fail(-3, 'limit', 'must be a positive integer') end
local now = now_us(ARGV[3])

local expired = expire_records(wrk_key, cut_key, now, head_prefix, worker)
local added, refreshed = record_blocks(wrk_key, cut_key, workers_key, head_prefix, worker,
  unpack_fixed(chain, 16), now, ttl_new * 1000, ttl_held * 1000, held)
local evicted = trim_to_capacity(wrk_key, capacity, limit, head_prefix, worker)
return {added, refreshed, evicted, expired}
