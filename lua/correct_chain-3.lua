#!lua
--[[
correct_chain: the engine reported fewer cached tokens for a request than the router matched
on its worker, so the worker's records of that chain past the engine's depth are wrong (a
restart without events, lost notices). Drop them, for this worker only, and mark the first
dropped block as a hole so that every other chain through it (the chained keys make any
deeper block imply this one) stops matching there too: the worker stops attracting traffic
for the whole lost subtree after one request instead of after the records' TTL.

Optionally (ARGV[4] > 0) it also drops the worker's records last accessed before a cut: the
caller passes it when it knows the engine did hold the first missing block after that time (a
request through it completed there), so the block was evicted since; an engine that evicts the
least recently used blocks first has then evicted every block last used before it too. That
is what heals a silent restart at once: one request shows the hottest block gone, and the
worker's other stale chains go with it, not one misrouted request each.

KEYS[1]  the worker's records ZSET  "kvr:{m}:wrk:<worker>"
KEYS[2]  the worker's hole ZSET  "kvr:{m}:cut:<worker>"
KEYS[3]  the worker's last accesses "kvr:{m}:lru:<worker>"
ARGV[1]  worker id
ARGV[2]  the chain's blocks from the first one the engine did not have, in chain order:
         16 lowercase hex digits each, back to back (the caller bounds their number); may be
         empty when a cut is given (the engine restarted: only the cut applies)
ARGV[3]  now, ms since the epoch (0 = the Redis server clock)
ARGV[4]  the cut, us since the epoch on the clock the records' last accesses were written
         with: also drop records last accessed before it (0 = only the chain)
ARGV[5]  most records older than the cut to drop in this call, the most recently used first
         (the caller calls again while it gets this many: one call stays short)

Returns  {records of the chain removed (0 when a replica already corrected the same chain),
          records older than the cut removed}
Errors   KVR -1 worker | -2 blocks | -3 now, cut_us, limit

Idempotent: a second call finds nothing to remove and leaves the hole as it is. A later
record of the chain (a dispatch, an engine event) fills the hole, as record_chain does.
]]

local wrk_key, cut_key, lru_key = KEYS[1], KEYS[2], KEYS[3]
local worker, blocks = ARGV[1], ARGV[2]
if not valid_worker(worker) then return fail(-1, 'worker', 'empty, too long, or has "|" or whitespace') end
if ARGV[3] ~= '0' and not int_arg(ARGV[3], 1) then return fail(-3, 'now', 'must be an integer >= 0 (ms)') end
if not int_arg(ARGV[4], 0) then return fail(-3, 'cut_us', 'must be an integer >= 0') end
if not int_arg(ARGV[5], 1) then return fail(-3, 'limit', 'must be an integer >= 1') end
local now = now_us(ARGV[3])
local cut, limit = tonumber(ARGV[4]), tonumber(ARGV[5])
if (#blocks == 0 and cut == 0) or not packed_ok(blocks, 16) then
  return fail(-2, 'blocks', 'expected 16 lowercase hex digits per block, at least one block without a cut')
end

local hexes = unpack_fixed(blocks, 16)
local chain = 0
if #hexes > 0 then
  -- The hole lives as long as the stale record would have: past that the record is gone anyway.
  local first = redis.call('ZSCORE', wrk_key, hexes[1])
  if first and tonumber(first) >= now then mark_hole(cut_key, hexes[1], tonumber(first)) end
  batches(hexes, 1, 'ZREM', lru_key)
  chain = batches(hexes, 1, 'ZREM', wrk_key)
end
local older = 0
if cut > 0 then
  -- Newest first: a restart's clear takes several calls, and the records used last are the
  -- ones the next lookups are most likely to match.
  local old = redis.call('ZREVRANGEBYSCORE', lru_key, '(' .. cut, '-inf', 'LIMIT', 0, limit)
  if #old > 0 then
    batches(old, 1, 'ZREM', lru_key)
    older = batches(old, 1, 'ZREM', wrk_key)
  end
end
return {chain, older}
