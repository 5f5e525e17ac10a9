-- Row-level security evaluates the caller's identity once per query, not once per row.
--
-- pgvpn.my_peer() is SECURITY DEFINER, which PostgreSQL never inlines: written bare in a policy
-- it ran for every row a receiver fetched (a third of its backend's CPU under load). As a
-- scalar subquery it becomes an InitPlan, evaluated once per statement; the policies mean the
-- same as in schema v2.

ALTER POLICY peer_reads_own ON pgvpn.packet
    USING (dst_peer = (SELECT pgvpn.my_peer()));
ALTER POLICY peer_sees_own ON pgvpn.link
    USING ((SELECT pgvpn.my_peer()) IN (src, dst));
ALTER POLICY peer_sees_own ON pgvpn.cursor
    USING ((SELECT pgvpn.my_peer()) IN (src, dst));
ALTER POLICY receiver_moves_own ON pgvpn.cursor
    USING (dst = (SELECT pgvpn.my_peer())) WITH CHECK (dst = (SELECT pgvpn.my_peer()));
