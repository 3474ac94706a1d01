-- Enqueue many arq jobs in one round trip, with arq's own dedupe rule: a job
-- id is skipped while arq:job:<id> or arq:result:<id> exists (what
-- ArqRedis.enqueue_job checks with WATCH/EXISTS/MULTI, one job at a time).
--
-- KEYS[1]           the queue (sorted set)
-- KEYS[2i], KEYS[2i+1]  arq:job:<id_i>, arq:result:<id_i>   for i = 1..n
-- ARGV[1]           score (enqueue time, ms)
-- ARGV[2]           job key time-to-live (ms)
-- ARGV[2+i]         serialized job i
-- ARGV[2+n+i]       job id i
-- Returns n flags (1 added, 0 already known) followed by the queue's length.
local queue = KEYS[1]
local score = ARGV[1]
local ttl = ARGV[2]
local n = (#KEYS - 1) / 2
local result = {}
for i = 1, n do
    local job_key = KEYS[2 * i]
    local result_key = KEYS[2 * i + 1]
    if redis.call('EXISTS', job_key, result_key) == 0 then
        redis.call('PSETEX', job_key, ttl, ARGV[2 + i])
        redis.call('ZADD', queue, score, ARGV[2 + n + i])
        result[i] = 1
    else
        result[i] = 0
    end
end
result[n + 1] = redis.call('ZCARD', queue)
return result
