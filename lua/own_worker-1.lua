#!lua
--[[
own_worker: the lease that makes one listener replica the only one applying a worker's event
stream. Acquire takes a free or expired lease (or renews one's own) and returns a fencing
epoch that grows with every change of owner; release gives the lease up at once (a draining
listener hands over without waiting for expiry). The key is fleet-wide (no model hash tag):
it is the only key this script touches.

KEYS[1]  the worker's owner HASH  "kvr:listener:owner:<worker>"
         owner -> listener id, until -> lease end (ms, Redis clock), epoch -> fencing epoch,
         "ns:<model>" -> 1 for every model the owner has written the worker's events under
ARGV[1]  listener id (1-256 printable characters, no whitespace)
ARGV[2]  mode: "acquire" or "release"
ARGV[3]  lease, ms (> 0; ignored by release)

Returns  {status, epoch, owner, until ms, model, model, ...}: status 1 = the caller holds the
         lease (acquired or renewed; released for "release"), 0 = another listener holds it
         (owner and until say who and until when). The epoch of a new owner is
         max(previous epoch + 1, now in ms), so it grows even across the key's expiry.
         The models are the "ns:" fields: where a new owner must claim the worker.
Errors   KVR -3 <argument name>
]]

local key = KEYS[1]
local me, mode = ARGV[1], ARGV[2]
if not me or #me == 0 or #me > 256 or string.find(me, '%s') then
  return fail(-3, 'listener', 'must be 1-256 characters without whitespace')
end
if mode ~= 'acquire' and mode ~= 'release' then return fail(-3, 'mode', 'must be "acquire" or "release"') end
local lease = int_arg(ARGV[3], 1)
if mode == 'acquire' and not lease then return fail(-3, 'lease', 'must be a positive integer (ms)') end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local flat = redis.call('HGETALL', key)
local h, models = {}, {}
for i = 1, #flat, 2 do
  h[flat[i]] = flat[i + 1]
  if string.sub(flat[i], 1, 3) == 'ns:' then models[#models + 1] = string.sub(flat[i], 4) end
end
local owner = h['owner'] or ''
local until_ms = tonumber(h['until'] or '0') or 0
local epoch = tonumber(h['epoch'] or '0') or 0

local function reply(status)
  local out = {status, epoch, owner, until_ms}
  for _, m in ipairs(models) do out[#out + 1] = m end
  return out
end

if mode == 'release' then
  if owner ~= me then return reply(0) end
  until_ms = 0
  redis.call('HSET', key, 'until', 0)
  return reply(1)
end
if owner ~= me then
  if owner ~= '' and until_ms >= now then return reply(0) end
  epoch = math.max(epoch + 1, now)
  owner = me
end
until_ms = now + lease
redis.call('HSET', key, 'owner', owner, 'until', until_ms, 'epoch', epoch)
-- Outlive any lease by far, so the epoch survives while anyone could still hold an old one.
redis.call('PEXPIRE', key, math.max(7 * 86400000, 10 * lease))
return reply(1)
