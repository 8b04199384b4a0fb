#!lua flags=no-writes
--[[
lookup_tiers: which blocks of one prompt's chain each candidate worker holds on lower storage
tiers (CPU memory, disk, ...). Read-only. Sent in the same pipeline as lookup_chain, so a
lookup with tiers is still one round trip; the caller combines the two replies (the tier
depth is how far the chain continues on a tier past the GPU depth).

KEYS[1]  tier key prefix        "kvr:{m}:tier:"   (ZSETs KEYS[1] .. <medium> .. "|" .. <worker>)
KEYS[2]  tier workers prefix    "kvr:{m}:tiers:"  (ZSETs KEYS[2] .. <medium>)
ARGV[1]  now, ms since the epoch (0 = the Redis server clock)
ARGV[2]  the chain from its first block: 16 lowercase hex digits per block, back to back
ARGV[3]  candidate workers separated by "\n" ("" = any worker)
ARGV[4]  media separated by "\n" (e.g. "CPU\nDISK")

Returns  {medium, worker, held, medium, worker, held, ...}: `held` is a string of one
         character per chain block, "1" where the worker holds that block live on the
         medium, "0" elsewhere; only (medium, worker) pairs holding at least one block.
Errors   KVR -2 chain (malformed chain)

Keys built from the prefixes (the per-worker tier sets) are not in KEYS, like lookup_chain's
worker sets: which workers to read is known only once the tier's workers set is read. They
all carry the model's hash tag, so they are in the same Cluster slot as KEYS[1].
]]

local tier_prefix, workers_prefix = KEYS[1], KEYS[2]
local chain = ARGV[2]
if #chain % 16 ~= 0 then return fail(-2, 'chain', 'expected 16 lowercase hex digits per block') end
local now = now_us(ARGV[1])
local n = #chain / 16
local out = {}
if n == 0 then return out end

local allowed = nil
if ARGV[3] and #ARGV[3] > 0 then
  allowed = {}
  for w in string.gmatch(ARGV[3], '[^\n]+') do allowed[w] = true end
end
local hexes = unpack_fixed(chain, 16)

for medium in string.gmatch(ARGV[4] or '', '[^\n]+') do
  local workers = redis.call('ZRANGEBYSCORE', workers_prefix .. medium, now, '+inf')
  table.sort(workers)
  for _, w in ipairs(workers) do
    if allowed == nil or allowed[w] then
      local _, scores = batches(hexes, 1, 'ZMSCORE', tier_prefix .. medium .. '|' .. w)
      local bits, any = {}, false
      for i = 1, n do
        local s = scores[i]
        if s and tonumber(s) >= now then
          bits[i] = '1'
          any = true
        else
          bits[i] = '0'
        end
      end
      if any then
        out[#out + 1] = medium
        out[#out + 1] = w
        out[#out + 1] = table.concat(bits)
      end
    end
  end
end
return out
