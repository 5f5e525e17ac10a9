-- Wire packets per row. With TUN offload a row can be a TCP burst that leaves the receiving host
-- as several segments (schema v7's offload column); operators count what crossed the wire.
--
-- The offload header is struct virtio_net_hdr in the sender's byte order: little-endian on the
-- platforms pgvpn runs on (x86-64, arm64). gso_type at byte 1, hdr_len at 2-3, gso_size at 4-5.
-- No SET search_path: an immutable SQL function without one is inlined into the views' scans
-- (it runs with the caller's rights and names only built-ins).
CREATE FUNCTION pgvpn.segments(offload bytea, length integer)
RETURNS integer
LANGUAGE sql
IMMUTABLE PARALLEL SAFE
AS $$
SELECT CASE
    WHEN offload IS NULL OR octet_length(offload) < 10 OR get_byte(offload, 1) = 0
         OR get_byte(offload, 4) + 256 * get_byte(offload, 5) = 0 THEN 1
    ELSE greatest(1, ceil((length - get_byte(offload, 2) - 256 * get_byte(offload, 3))::numeric
                          / (get_byte(offload, 4) + 256 * get_byte(offload, 5))))::integer
END
$$;
COMMENT ON FUNCTION pgvpn.segments(bytea, integer) IS
    'How many wire packets a row stands for: 1, or its TSO burst cut at gso_size.';
GRANT EXECUTE ON FUNCTION pgvpn.segments(bytea, integer) TO pgvpn_agent, pgvpn_reader;

-- The views gain the wire count as their last column (packets stays the count of rows).
CREATE OR REPLACE VIEW pgvpn.flow AS
SELECT s.name AS src_peer, d.name AS dst_peer, p.ip_version, p.protocol,
       p.src_addr, p.src_port, p.dst_addr, p.dst_port,
       count(*) AS packets, sum(p.length) AS bytes,
       min(p.sent_at) AS first_seen, max(p.sent_at) AS last_seen,
       sum(pgvpn.segments(p.offload, p.length)) AS segments
FROM pgvpn.packet p
JOIN pgvpn.peer s ON s.id = p.src_peer
JOIN pgvpn.peer d ON d.id = p.dst_peer
GROUP BY s.name, d.name, p.ip_version, p.protocol, p.src_addr, p.src_port, p.dst_addr,
         p.dst_port;
COMMENT ON VIEW pgvpn.flow IS 'One row per 5-tuple and direction: packets (rows), bytes, '
    'first/last seen, segments (wire packets: a TSO burst counts as the segments it leaves as).';

CREATE OR REPLACE VIEW pgvpn.traffic_per_minute AS
SELECT date_trunc('minute', p.logged_at) AS minute, s.name AS src_peer, d.name AS dst_peer,
       count(*) AS packets, sum(p.length) AS bytes,
       sum(pgvpn.segments(p.offload, p.length)) AS segments
FROM pgvpn.packet p
JOIN pgvpn.peer s ON s.id = p.src_peer
JOIN pgvpn.peer d ON d.id = p.dst_peer
GROUP BY 1, 2, 3;
COMMENT ON VIEW pgvpn.traffic_per_minute IS 'Per-link packets (rows), bytes and segments '
    '(wire packets) per minute.';
