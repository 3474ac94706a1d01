-- After a batch job ran: drop the markers of rows that ended, and schedule the
-- rows to run again (each group as a new job, deferred), in one round trip.
--
-- A marker is only touched while it names this job (or nothing that is queued
-- or running): a row scheduled meanwhile by someone else keeps its job.
--
-- KEYS[1]        the queue (sorted set)
-- KEYS[2]        the queue's wake-up list
-- ARGV[1]        this job's id
-- ARGV[2]        key time-to-live (ms)
-- ARGV[3]        unused (0; kept for the positions): a retry is due defer_ms after the
--                Redis server's clock (TIME), which claim.lua compares with
-- ARGV[4]        function name
-- ARGV[6]        the identity the jobs scheduled again carry ('' : none)
-- ARGV[5]        JSON: {"done": [marker, ...],
--                       "again": [{"id": job id, "defer_ms": n, "rows": [[row, marker, delivery], ...]}]}
-- Returns the number of rows scheduled again.
local queue, wake = KEYS[1], KEYS[2]
local own, ttl, fname = ARGV[1], ARGV[2], ARGV[4]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local plan = cjson.decode(ARGV[5])
local kwargs = (ARGV[6] ~= '') and {database = ARGV[6]} or {}

local function ours(marker)
    local kind = redis.call('TYPE', marker).ok
    if kind == 'none' then
        return true
    end
    if kind ~= 'string' then
        return true
    end
    local holder = redis.call('GET', marker)
    if holder == own then
        return true
    end
    return redis.call('ZSCORE', queue, holder) == false
        and redis.call('EXISTS', 'arq:in-progress:' .. holder) == 0
end

for _, marker in ipairs(plan.done) do
    if redis.call('TYPE', marker).ok == 'string' and redis.call('GET', marker) == own then
        redis.call('DEL', marker)
    end
end

local again = 0
for _, group in ipairs(plan.again) do
    local rows = {}
    for _, row in ipairs(group.rows) do
        if ours(row[2]) then
            rows[#rows + 1] = row
        end
    end
    if #rows > 0 then
        local due = now + group.defer_ms
        local payload = cjson.encode({t = 1, f = fname, a = {rows}, k = kwargs, et = due})
        redis.call('PSETEX', 'arq:job:' .. group.id, ttl, payload)
        redis.call('ZADD', queue, due, group.id)
        for _, row in ipairs(rows) do
            redis.call('SET', row[2], group.id, 'PX', ttl)
        end
        redis.call('RPUSH', wake, 1)
        again = again + #rows
    end
end
redis.call('LTRIM', wake, -1000, -1)
redis.call('PEXPIRE', wake, 60000)
return again
