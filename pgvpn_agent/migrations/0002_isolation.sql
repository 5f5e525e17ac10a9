-- pgvpn schema v2: peers are isolated from each other.
--
-- Peers write only through send_batch() (schema v1), which checks the caller's identity once per
-- batch; here they are limited to reading rows addressed to them (row-level security).
-- Operators get pgvpn_reader.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pgvpn_reader') THEN
        CREATE ROLE pgvpn_reader NOLOGIN;
    END IF;
END
$$;

GRANT EXECUTE ON FUNCTION pgvpn.my_peer() TO pgvpn_reader;

ALTER TABLE pgvpn.packet ENABLE ROW LEVEL SECURITY;
CREATE POLICY peer_reads_own ON pgvpn.packet FOR SELECT TO pgvpn_agent
    USING (dst_peer = pgvpn.my_peer());
CREATE POLICY reader_reads_all ON pgvpn.packet FOR SELECT TO pgvpn_reader USING (true);

ALTER TABLE pgvpn.link ENABLE ROW LEVEL SECURITY;
CREATE POLICY peer_sees_own ON pgvpn.link FOR SELECT TO pgvpn_agent
    USING (pgvpn.my_peer() IN (src, dst));
CREATE POLICY reader_reads_all ON pgvpn.link FOR SELECT TO pgvpn_reader USING (true);

ALTER TABLE pgvpn.cursor ENABLE ROW LEVEL SECURITY;
CREATE POLICY peer_sees_own ON pgvpn.cursor FOR SELECT TO pgvpn_agent
    USING (pgvpn.my_peer() IN (src, dst));
CREATE POLICY receiver_moves_own ON pgvpn.cursor FOR UPDATE TO pgvpn_agent
    USING (dst = pgvpn.my_peer()) WITH CHECK (dst = pgvpn.my_peer());
CREATE POLICY reader_reads_all ON pgvpn.cursor FOR SELECT TO pgvpn_reader USING (true);

GRANT USAGE ON SCHEMA pgvpn TO pgvpn_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA pgvpn TO pgvpn_reader;
