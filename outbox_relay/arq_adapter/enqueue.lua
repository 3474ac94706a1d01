-- Hand rows over as batch jobs, in one round trip, all or nothing.
--
-- Each row has a dedupe marker (a string key, value: the arq job id that holds
-- the row). A row is skipped while its marker names a job that is waiting in
-- the queue or running (arq:in-progress:<id>); a marker naming anything else
-- (a lost job, a job never fully written, junk, a key of another type) is
-- orphaned and replaced. The surviving rows are packed into ceil(k / B) jobs of
-- even size, serialized as JSON (arq's job fields f, a, k, t, et).
--
-- Everything is checked before anything is written, so that a refusal
-- (WRONGTYPE on the queue or its wake-up list) leaves no marker behind.
--
-- KEYS[1]        the queue (sorted set)
-- KEYS[2]        the queue's wake-up list (one element per job added)
-- KEYS[2+i]      the marker of row i, i = 1..n
-- ARGV[1]        unused (0; kept for the positions): the score, the enqueue time in
--                ms, is the Redis server's clock (TIME), which claim.lua compares with
-- ARGV[2]        key time-to-live (ms)
-- ARGV[3]        batch size B
-- ARGV[4]        job id prefix (unique per call)
-- ARGV[5]        function name
-- ARGV[6]        the service database's identity, carried by every job as the
--                keyword argument ``database`` ('' : none)
-- ARGV[6+i]      row id i
-- Returns {rows added, jobs added, queue length, jobs due and unclaimed before
-- this call (among the first 20 due: any means the workers are behind)}.
local queue, wake = KEYS[1], KEYS[2]
local clock = redis.call('TIME')
local score = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local ttl, size = ARGV[2], tonumber(ARGV[3])
local prefix, fname = ARGV[4], ARGV[5]
local kwargs = (ARGV[6] ~= '') and {database = ARGV[6]} or {}
local n = #KEYS - 2

for _, key in ipairs({queue, wake}) do
    local kind = redis.call('TYPE', key).ok
    local wanted = (key == queue) and 'zset' or 'list'
    if kind ~= 'none' and kind ~= wanted then
        return redis.error_reply('WRONGTYPE ' .. key .. ' holds a ' .. kind .. ', not a ' .. wanted)
    end
end

local function known(marker)
    if redis.call('TYPE', marker).ok ~= 'string' then
        return false
    end
    local holder = redis.call('GET', marker)
    return redis.call('ZSCORE', queue, holder) ~= false
        or redis.call('EXISTS', 'arq:in-progress:' .. holder) == 1
end

local unclaimed = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', queue, '-inf', score, 'LIMIT', 0, 20)) do
    if redis.call('EXISTS', 'arq:in-progress:' .. id) == 0 then
        unclaimed = unclaimed + 1
    end
end

local fresh = {}
for i = 1, n do
    if not known(KEYS[2 + i]) then
        fresh[#fresh + 1] = i
    end
end
local k = #fresh
if k == 0 then
    return {0, 0, redis.call('ZCARD', queue), unclaimed}
end
local jobs = math.ceil(k / size)
local base, extra = math.floor(k / jobs), k % jobs
for j = 1, jobs do
    if redis.call('EXISTS', 'arq:job:' .. prefix .. j) == 1 then
        return redis.error_reply('job id ' .. prefix .. j .. ' exists already')
    end
end

-- Writes (nothing above wrote).
local at = 1
for j = 1, jobs do
    local jid = prefix .. j
    local count = base + ((j <= extra) and 1 or 0)
    local rows = {}
    for r = 1, count do
        local i = fresh[at + r - 1]
        rows[r] = {tonumber(ARGV[6 + i]), KEYS[2 + i], 1}
    end
    local payload = cjson.encode({t = 1, f = fname, a = {rows}, k = kwargs, et = score})
    redis.call('PSETEX', 'arq:job:' .. jid, ttl, payload)
    redis.call('ZADD', queue, score, jid)
    -- Markers last: a write failing above leaves none naming a job that is not queued.
    for r = 1, count do
        redis.call('SET', KEYS[2 + fresh[at + r - 1]], jid, 'PX', ttl)
    end
    at = at + count
    redis.call('RPUSH', wake, 1)
end
redis.call('LTRIM', wake, -1000, -1)
redis.call('PEXPIRE', wake, 60000)
return {k, jobs, redis.call('ZCARD', queue), unclaimed}
