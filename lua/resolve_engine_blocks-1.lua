#!lua flags=no-writes
--[[
resolve_engine_blocks: the router keys that engine block hashes map to, for one worker. The
listener uses it to chain a BlockStored event whose parent it has not seen in this process.

KEYS[1]  the worker's engine map  "kvr:{m}:emap:<worker>"
ARGV[1]  engine hashes: 16 lowercase hex digits each, back to back

Returns  one entry per hash: the router key (16 hex) or false when unknown
Errors   KVR -2 blocks
]]

local emap_key, blocks = KEYS[1], ARGV[1]
if not packed_ok(blocks, 16) then return fail(-2, 'blocks', 'expected 16 lowercase hex digits per block') end
local hashes = unpack_fixed(blocks, 16)
local _, vs = batches(hashes, 1, 'HMGET', emap_key)
local out = {}
for k = 1, #hashes do
  local v = vs[k]
  out[k] = v and string.match(v, '^(%x+):') or false
end
return out
