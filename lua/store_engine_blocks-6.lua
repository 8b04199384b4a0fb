#!lua
--[[
store_engine_blocks: apply engine BlockStored events for one worker. Maps each engine block
hash to the router key the listener computed from the event's token ids (reference-counted:
engines may hold duplicate copies of a block), counts each block's recorded children (so a
later out-of-order removal knows it leaves a hole), and records confirmed residency.

KEYS[1]  the worker's engine map  "kvr:{m}:emap:<worker>"
         HASH engine hex -> "<router key hex>:<parent engine hex or ->:<refs>:<children>"
KEYS[2]  the worker's records ZSET   "kvr:{m}:wrk:<worker>"
KEYS[3]  the worker's hole ZSET   "kvr:{m}:cut:<worker>"
KEYS[4]  workers ZSET             "kvr:{m}:workers"
KEYS[5]  head key prefix          "kvr:{m}:head:"
KEYS[6]  the worker's last accesses "kvr:{m}:lru:<worker>"
ARGV[1]  worker id
ARGV[2]  blocks, 48 lowercase hex digits each, in event order: engine hash (16), parent engine
         hash (16; ignored for a root), router key (16)
ARGV[3]  one "1"/"0" character per block: 1 = the block starts a chain (no parent)
ARGV[4]  now, ms since the epoch (0 = the Redis server clock)
ARGV[5]  ttl, ms (> 0): life of a confirmed record
ARGV[6]  capacity in blocks (0 = unlimited)
ARGV[7]  the most records to trim in this call (> 0)

Returns  {stored, duplicates, added, refreshed, evicted, expired}
Errors   KVR -1 worker | -2 blocks | -3 <argument name>
]]

local emap_key, wrk_key, cut_key, workers_key, head_prefix, lru_key =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local worker, blocks, roots = ARGV[1], ARGV[2], ARGV[3]
if not valid_worker(worker) then return fail(-1, 'worker', 'empty, too long, or has "|" or whitespace') end
if not packed_ok(blocks, 48) then return fail(-2, 'blocks', 'expected 48 lowercase hex digits per block') end
if #roots ~= #blocks / 48 or string.find(roots, '[^01]') then
  return fail(-3, 'roots', 'must hold one 0/1 character per block')
end
if ARGV[4] ~= '0' and not int_arg(ARGV[4], 1) then return fail(-3, 'now', 'must be an integer >= 0 (ms)') end
local ttl = int_arg(ARGV[5], 1)
if not ttl then return fail(-3, 'ttl', 'must be a positive integer (ms)') end
local capacity = int_arg(ARGV[6], 0)
if not capacity then return fail(-3, 'capacity', 'must be an integer >= 0 (blocks)') end
local limit = int_arg(ARGV[7], 1)
if not limit then return fail(-3, 'limit', 'must be a positive integer') end
local now = now_us(ARGV[4])
ttl = ttl * 1000

local ENTRY = '^(%x+):([%x-]*):(%d+):(%d+)$'
local expired = expire_records(wrk_key, cut_key, now, head_prefix, worker, lru_key)
local stored, dups = 0, 0
local hexes = {}
local heads = {}
for i = 1, #blocks / 48 do
  local off = (i - 1) * 48
  local eh = string.sub(blocks, off + 1, off + 16)
  local rk = string.sub(blocks, off + 33, off + 48)
  local v = redis.call('HGET', emap_key, eh)
  local m_rk, m_parent, refs, kids
  if v then m_rk, m_parent, refs, kids = string.match(v, ENTRY) end
  if m_rk then
    -- A duplicate copy of a block the engine already announced: one more reference.
    redis.call('HSET', emap_key, eh, m_rk .. ':' .. m_parent .. ':' .. (tonumber(refs) + 1) .. ':' .. kids)
    dups = dups + 1
    rk = m_rk
  else
    local parent = '-'
    if string.sub(roots, i, i) == '0' then
      parent = string.sub(blocks, off + 17, off + 32)
      local pv = redis.call('HGET', emap_key, parent)
      local a, b, c, d
      if pv then a, b, c, d = string.match(pv, ENTRY) end
      if a then redis.call('HSET', emap_key, parent, a .. ':' .. b .. ':' .. c .. ':' .. (tonumber(d) + 1)) end
    end
    redis.call('HSET', emap_key, eh, rk .. ':' .. parent .. ':1:0')
    stored = stored + 1
  end
  hexes[#hexes + 1] = rk
  if string.sub(roots, i, i) == '1' then heads[#heads + 1] = rk end
end
extend_expiry(emap_key, now + ttl)
local added, refreshed = record_blocks(wrk_key, cut_key, workers_key, worker, hexes, now, ttl, lru_key)
for _, h in ipairs(heads) do add_head(head_prefix, worker, h, now + ttl) end
local evicted = trim_to_capacity(wrk_key, capacity, limit, head_prefix, worker, lru_key)
return {stored, dups, added, refreshed, evicted, expired}
