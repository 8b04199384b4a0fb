#!lua
--[[
clear_worker: forget everything one worker holds for a model (engine restart,
AllBlocksCleared, worker removed, or a gap in its event stream that replay could not fill).
Atomic: no lookup sees a half-cleared worker. UNLINK frees the memory off the main thread.

KEYS[1]  the worker's records ZSET     "kvr:{m}:wrk:<worker>"
KEYS[2]  the worker's hole ZSET     "kvr:{m}:cut:<worker>"
KEYS[3]  the worker's engine map    "kvr:{m}:emap:<worker>"
KEYS[4]  workers ZSET               "kvr:{m}:workers"
KEYS[5]  head key prefix            "kvr:{m}:head:"  (the worker is dropped from every chain
         head it recorded, listed in KEYS[5] .. "@" .. worker)
KEYS[6]  the worker's last accesses "kvr:{m}:lru:<worker>"
ARGV[1]  worker id

Returns  the number of residency records dropped
Errors   KVR -1 worker
]]

local wrk_key, cut_key, emap_key, workers_key, head_prefix, lru_key =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local worker = ARGV[1]
if not valid_worker(worker) then return fail(-1, 'worker', 'empty, too long, or has "|" or whitespace') end
local dropped = redis.call('ZCARD', wrk_key)
redis.call('UNLINK', wrk_key, cut_key, emap_key, lru_key)
redis.call('ZREM', workers_key, worker)
clear_heads(head_prefix, worker)
return dropped
