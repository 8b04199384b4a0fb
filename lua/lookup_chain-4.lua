#!lua flags=no-writes
--[[
lookup_chain: for one prompt's chain of block keys, how deep each candidate worker's cached
prefix goes, plus the shared load the scorer needs. Read-only; one round trip per request.

KEYS[1]  worker LRU key prefix   "kvr:{m}:wrk:"   (per-worker ZSETs KEYS[1] .. <worker>)
KEYS[2]  hole key prefix         "kvr:{m}:cut:"   (per-worker ZSETs KEYS[2] .. <worker>)
KEYS[3]  load HASH               "kvr:{m}:load"
KEYS[4]  head key prefix         "kvr:{m}:head:"  (ZSET of workers per chain head block)
ARGV[1]  now, ms since the epoch (0 = the Redis server clock)
ARGV[2]  the chain from its first block: 16 lowercase hex digits per block, back to back
ARGV[3]  candidate workers separated by "\n" ("" = any worker)

Returns  { {worker, depth, worker, depth, ...},   -- only workers with depth >= 1, in blocks
           {field, value, ...},                    -- HGETALL of the load hash
           probes }                                -- ZMSCORE calls made (cost of this call)
Errors   KVR -2 chain (malformed chain)

Depth is the consecutive match from the head, cut at the first block the worker does not hold
live. Only workers in the head ZSET of the chain's first block (a superset of those holding
it) are probed. The search relies on the prefix property (a worker holding block i holds every
block before it): each ZMSCORE reads a few positions and narrows the interval between the last
hit and the first miss; the first call tries 1, n and the depths already found for other
workers, later calls split the interval 8 ways. The hole ZSET
records blocks removed out of order and cuts the chain there, so a removed middle block still
ends the match. The chain's length is checked, not its digits: a chain that is not lowercase
hex matches nothing.
]]

local wrk_prefix, cut_prefix, load_key, head_prefix = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local chain = ARGV[2]
if #chain % 16 ~= 0 then return fail(-2, 'chain', 'expected 16 lowercase hex digits per block') end
local now = now_us(ARGV[1])
local n = #chain / 16
local probes = 0

local memo = {}
local function key_at(i)
  local k = memo[i]
  if not k then
    k = string.sub(chain, (i - 1) * 16 + 1, i * 16)
    memo[i] = k
  end
  return k
end

-- Probe sorted `positions` of one worker's ZSET in one call; returns the index of the first
-- position not held live (nil if all are).
local function first_miss(wk, positions)
  local args = {}
  for i, p in ipairs(positions) do args[i] = key_at(p) end
  probes = probes + 1
  local scores = redis.call('ZMSCORE', wk, unpack(args))
  for i = 1, #positions do
    local s = scores[i]
    if not s or tonumber(s) < now then return i end
  end
  return nil
end

-- Depths already found in this call. Workers that share a prefix (a system prompt, the same
-- conversation) usually share its depth, so "d held, d + 1 not" settles most of them in one
-- call of a few positions. Redis 7.0 formats each returned score with %.17g, so reading
-- fewer positions is what makes a lookup cheap.
local hints, hint_seen = {}, {}

local function search(wk)
  local lo, hi = 0, n + 1  -- positions 1..lo are held; position hi is not (n + 1: unknown)
  local want = {[1] = true, [n] = true}
  for i = #hints, math.max(1, #hints - 7), -1 do
    local d = hints[i]
    want[d] = true
    if d < n then want[d + 1] = true end
  end
  local positions = {}
  for p in pairs(want) do positions[#positions + 1] = p end
  table.sort(positions)
  lo = narrow_held(function(ps) return first_miss(wk, ps) end, positions, lo, hi, n)
  if lo > 0 and lo < n and not hint_seen[lo] then
    hint_seen[lo] = true
    hints[#hints + 1] = lo
  end
  return lo
end

local candidates = {}
if n > 0 then
  candidates = redis.call('ZRANGEBYSCORE', head_prefix .. key_at(1), now, '+inf')
  if ARGV[3] and #ARGV[3] > 0 then
    local allowed = {}
    for w in string.gmatch(ARGV[3], '[^\n]+') do allowed[w] = true end
    local kept = {}
    for _, w in ipairs(candidates) do
      if allowed[w] then kept[#kept + 1] = w end
    end
    candidates = kept
  end
  table.sort(candidates)
end

local flat = {}
local pos = nil
if n > 0 then
  for _, w in ipairs(candidates) do
    local d = search(wrk_prefix .. w)
    if d > 0 and redis.call('EXISTS', cut_prefix .. w) == 1 then
      local holes = redis.call('ZRANGEBYSCORE', cut_prefix .. w, now, '+inf')
      if #holes > 0 then
        if pos == nil then
          pos = {}
          for i = 1, n do pos[key_at(i)] = i end
        end
        for _, hh in ipairs(holes) do
          local p = pos[hh]
          if p and p <= d then d = p - 1 end
        end
      end
    end
    if d > 0 then
      flat[#flat + 1] = w
      flat[#flat + 1] = d
    end
  end
end
return {flat, redis.call('HGETALL', load_key), probes}
