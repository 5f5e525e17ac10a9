-- pgvpn schema v3: reading the log.
--
-- Time ranges are the common filter: partitions prune by day and a BRIN index narrows within a
-- day for almost no insert cost. The views summarise across peers, so they are for operators
-- (pgvpn_reader) only: a view runs with its owner's rights and would bypass row-level security.

CREATE INDEX packet_logged_at_brin ON pgvpn.packet USING brin (logged_at);

CREATE VIEW pgvpn.flow AS
SELECT s.name AS src_peer, d.name AS dst_peer, p.ip_version, p.protocol,
       p.src_addr, p.src_port, p.dst_addr, p.dst_port,
       count(*) AS packets, sum(p.length) AS bytes,
       min(p.sent_at) AS first_seen, max(p.sent_at) AS last_seen
FROM pgvpn.packet p
JOIN pgvpn.peer s ON s.id = p.src_peer
JOIN pgvpn.peer d ON d.id = p.dst_peer
GROUP BY s.name, d.name, p.ip_version, p.protocol, p.src_addr, p.src_port, p.dst_addr,
         p.dst_port;
COMMENT ON VIEW pgvpn.flow IS 'One row per 5-tuple and direction: packets, bytes, first/last seen.';

CREATE VIEW pgvpn.traffic_per_minute AS
SELECT date_trunc('minute', p.logged_at) AS minute, s.name AS src_peer, d.name AS dst_peer,
       count(*) AS packets, sum(p.length) AS bytes
FROM pgvpn.packet p
JOIN pgvpn.peer s ON s.id = p.src_peer
JOIN pgvpn.peer d ON d.id = p.dst_peer
GROUP BY 1, 2, 3;
COMMENT ON VIEW pgvpn.traffic_per_minute IS 'Per-link packets and bytes per minute.';

REVOKE ALL ON pgvpn.flow, pgvpn.traffic_per_minute FROM PUBLIC;
GRANT SELECT ON pgvpn.flow, pgvpn.traffic_per_minute TO pgvpn_reader;
