#!lua
--[[
correct_chain: the engine reported fewer cached tokens for a request than the router matched
on its worker, so the worker's records of that chain past the engine's depth are wrong (a
restart without events, lost notices). Drop them, for this worker only, and mark the first
dropped block as a hole so that every other chain through it (the chained keys make any
deeper block imply this one) stops matching there too: the worker stops attracting traffic
for the whole lost subtree after one request instead of after the records' TTL.

KEYS[1]  the worker's records ZSET  "kvr:{m}:wrk:<worker>"
KEYS[2]  the worker's hole ZSET  "kvr:{m}:cut:<worker>"
KEYS[3]  the worker's last accesses "kvr:{m}:lru:<worker>"
ARGV[1]  worker id
ARGV[2]  the chain's blocks from the first one the engine did not have, in chain order:
         16 lowercase hex digits each, back to back (the caller bounds their number)
ARGV[3]  now, ms since the epoch (0 = the Redis server clock)

Returns  number of records removed (0 when a replica already corrected the same chain)
Errors   KVR -1 worker | -2 blocks | -3 now

Idempotent: a second call finds nothing to remove and leaves the hole as it is. A later
record of the chain (a dispatch, an engine event) fills the hole, as record_chain does.
]]

local wrk_key, cut_key, lru_key = KEYS[1], KEYS[2], KEYS[3]
local worker, blocks = ARGV[1], ARGV[2]
if not valid_worker(worker) then return fail(-1, 'worker', 'empty, too long, or has "|" or whitespace') end
if #blocks == 0 or not packed_ok(blocks, 16) then
  return fail(-2, 'blocks', 'expected 16 lowercase hex digits per block, at least one block')
end
if ARGV[3] ~= '0' and not int_arg(ARGV[3], 1) then return fail(-3, 'now', 'must be an integer >= 0 (ms)') end
local now = now_us(ARGV[3])

local hexes = unpack_fixed(blocks, 16)
-- The hole lives as long as the stale record would have: past that the record is gone anyway.
local first = redis.call('ZSCORE', wrk_key, hexes[1])
if first and tonumber(first) >= now then mark_hole(cut_key, hexes[1], tonumber(first)) end
batches(hexes, 1, 'ZREM', lru_key)
return (batches(hexes, 1, 'ZREM', wrk_key))
