#!lua
--[[
evict_blocks: remove blocks from one worker (an explicit eviction notice). Optionally marks
each removed block as a hole, so a lookup cuts the chain there even if deeper blocks are still
recorded (engines evict tails first; a notice that removes a middle block must still end the
match).

KEYS[1]  the worker's records ZSET  "kvr:{m}:wrk:<worker>"
KEYS[2]  the worker's hole ZSET  "kvr:{m}:cut:<worker>"
KEYS[3]  the worker's last accesses "kvr:{m}:lru:<worker>"
ARGV[1]  worker id
ARGV[2]  block keys: 16 lowercase hex digits each, back to back
ARGV[3]  now, ms since the epoch (0 = the Redis server clock)
ARGV[4]  mark holes: "1" or "0"

Returns  number of records removed
Errors   KVR -1 worker | -2 blocks | -3 <argument name>
]]

local wrk_key, cut_key, lru_key = KEYS[1], KEYS[2], KEYS[3]
local worker, blocks = ARGV[1], ARGV[2]
if not valid_worker(worker) then return fail(-1, 'worker', 'empty, too long, or has "|" or whitespace') end
if not packed_ok(blocks, 16) then return fail(-2, 'blocks', 'expected 16 lowercase hex digits per block') end
if ARGV[3] ~= '0' and not int_arg(ARGV[3], 1) then return fail(-3, 'now', 'must be an integer >= 0 (ms)') end
if ARGV[4] ~= '0' and ARGV[4] ~= '1' then return fail(-3, 'mark_holes', 'must be 0 or 1') end
local now = now_us(ARGV[3])
local holes = ARGV[4] == '1'

local hexes = unpack_fixed(blocks, 16)
local _, old = batches(hexes, 1, 'ZMSCORE', wrk_key)
if holes then
  for k = 1, #hexes do
    local o = old[k]
    if o and tonumber(o) >= now then mark_hole(cut_key, hexes[k], tonumber(o)) end
  end
end
batches(hexes, 1, 'ZREM', lru_key)
return (batches(hexes, 1, 'ZREM', wrk_key))
