#!lua flags=no-writes
--[[
lookup_tiers: how far one prompt's chain continues on lower storage tiers (CPU memory, disk,
...) past each candidate worker's GPU prefix. Read-only. Sent in the same pipeline as
lookup_chain, so a lookup with tiers is still one round trip.

KEYS[1]  tier key prefix        "kvr:{m}:tier:"   (ZSETs KEYS[1] .. <medium> .. "|" .. <worker>)
KEYS[2]  tier workers prefix    "kvr:{m}:tiers:"  (ZSETs KEYS[2] .. <medium>)
KEYS[3]  worker LRU key prefix  "kvr:{m}:wrk:"    (per-worker ZSETs KEYS[3] .. <worker>)
ARGV[1]  now, ms since the epoch (0 = the Redis server clock)
ARGV[2]  the chain from its first block: 16 lowercase hex digits per block, back to back
ARGV[3]  candidate workers separated by "\n" ("" = any worker)
ARGV[4]  media separated by "\n" (e.g. "CPU\nDISK")

Returns  {medium, worker, gpu_depth, run, ...}: for each (medium, worker) whose tier holds the
         block right after the worker's GPU prefix, that prefix's depth (from the worker's
         records alone) and how many consecutive blocks from there the tier holds live.
Errors   KVR -2 chain (malformed chain)

Cost: the GPU depth and then each tier's run are found as lookup_chain finds a depth, a few
ZMSCORE calls narrowing the interval between the last hit and the first miss; both rely on
the prefix property (a tier drops a chain's tail first too, as the engine evicted it). A block
a tier removed from the middle of a run is not seen (the tiers keep no hole set): the run then
counts past it, an over-credit bounded by the tier's credit. Holes (the cut
set) are not read: the caller uses a run only when its gpu_depth equals lookup_chain's depth.

Keys built from the prefixes are not in KEYS, like lookup_chain's worker sets: which workers
to read is known only once the tier's workers set is read. They all carry the model's hash
tag, so they are in the same Cluster slot as KEYS[1].
]]

local tier_prefix, workers_prefix, wrk_prefix = KEYS[1], KEYS[2], KEYS[3]
local chain = ARGV[2]
if #chain % 16 ~= 0 then return fail(-2, 'chain', 'expected 16 lowercase hex digits per block') end
local now = now_us(ARGV[1])
local n = #chain / 16
local out = {}
if n == 0 then return out end

local function key_at(i) return string.sub(chain, (i - 1) * 16 + 1, i * 16) end

-- The index (in `positions`) of the first one not held live in `key`, or nil if all are.
local function first_miss(key, positions)
  local args = {}
  for i, p in ipairs(positions) do args[i] = key_at(p) end
  local scores = redis.call('ZMSCORE', key, unpack(args))
  for i = 1, #positions do
    local s = scores[i]
    if not s or tonumber(s) < now then return i end
  end
  return nil
end

-- How many consecutive blocks from position `from` on `key` holds live, relying on the
-- prefix property from there (a worker holding block i of the run holds every block of it
-- before i: engines evict, and tiers drop, a chain's tail first): each ZMSCORE reads a few
-- positions and narrows the interval between the last hit and the first miss.
local function run_from(key, from)
  if redis.call('EXISTS', key) == 0 then return 0 end
  -- Positions from..lo are held; hi is not (n + 1: unknown).
  local positions = {from, n}
  if from == n then positions = {n} end
  local miss = function(ps) return first_miss(key, ps) end
  return narrow_held(miss, positions, from - 1, n + 1, n) - from + 1
end

local allowed = nil
if ARGV[3] and #ARGV[3] > 0 then
  allowed = {}
  for w in string.gmatch(ARGV[3], '[^\n]+') do allowed[w] = true end
end

local depths = {}
for medium in string.gmatch(ARGV[4] or '', '[^\n]+') do
  local workers = redis.call('ZRANGEBYSCORE', workers_prefix .. medium, now, '+inf')
  table.sort(workers)
  for _, w in ipairs(workers) do
    if allowed == nil or allowed[w] then
      local d = depths[w]
      if d == nil then
        d = run_from(wrk_prefix .. w, 1)
        depths[w] = d
      end
      if d < n then
        local r = run_from(tier_prefix .. medium .. '|' .. w, d + 1)
        if r > 0 then
          out[#out + 1] = medium
          out[#out + 1] = w
          out[#out + 1] = d
          out[#out + 1] = r
        end
      end
    end
  end
end
return out
