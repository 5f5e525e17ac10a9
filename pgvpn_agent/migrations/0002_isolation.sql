-- pgvpn schema v2: peers are isolated from each other.
--
-- A peer's login role is bound to its peer name by convention (pgvpn_<name>, lower case, other
-- characters as '_'): the same rule the Ansible role and the lab use to create the roles. Peers
-- write only through send_batch(), which checks the caller's identity once per batch, and read
-- only rows addressed to them (row-level security). Operators get pgvpn_reader.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pgvpn_reader') THEN
        CREATE ROLE pgvpn_reader NOLOGIN;
    END IF;
END
$$;

ALTER TABLE pgvpn.peer ADD COLUMN db_role text
    GENERATED ALWAYS AS ('pgvpn_' || lower(regexp_replace(name, '[^A-Za-z0-9_]', '_', 'g')))
    STORED UNIQUE;
COMMENT ON COLUMN pgvpn.peer.db_role IS 'The login role that acts as this peer.';

-- session_user, not current_user: inside SECURITY DEFINER functions current_user is the owner.
CREATE FUNCTION pgvpn.my_peer()
RETURNS smallint
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pgvpn
AS $$ SELECT id FROM pgvpn.peer WHERE db_role = session_user $$;

CREATE OR REPLACE FUNCTION pgvpn.send_batch(
    p_src smallint,
    p_notify boolean,
    l_dst smallint[], l_first bigint[], l_last bigint[],
    r_dst smallint[], r_seq bigint[], r_sent_at timestamptz[], r_version smallint[],
    r_src_addr inet[], r_dst_addr inet[], r_protocol smallint[], r_src_port integer[],
    r_dst_port integer[], r_length integer[], r_fragment boolean[], r_payload bytea[])
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgvpn
AS $$
DECLARE
    advanced integer;
BEGIN
    IF p_src IS DISTINCT FROM pgvpn.my_peer() THEN
        RAISE EXCEPTION 'pgvpn: role % may only send as its own peer', session_user
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    UPDATE pgvpn.link l SET tx_seq = v.last, tx_at = statement_timestamp()
    FROM unnest(l_dst, l_first, l_last) AS v (dst, first, last)
    WHERE l.src = p_src AND l.dst = v.dst AND l.tx_seq = v.first - 1;
    GET DIAGNOSTICS advanced = ROW_COUNT;
    IF advanced <> cardinality(l_dst) THEN
        RAISE EXCEPTION 'pgvpn: link sequence moved under sender % (another agent with the same peer name?)', p_src
            USING ERRCODE = 'PV001';
    END IF;
    INSERT INTO pgvpn.packet (src_peer, dst_peer, seq, sent_at, ip_version, src_addr, dst_addr,
                              protocol, src_port, dst_port, length, fragment, payload)
    SELECT p_src, r.dst, r.seq, r.sent_at, r.version, r.src_addr, r.dst_addr, r.protocol,
           r.src_port, r.dst_port, r.length, r.fragment, r.payload
    FROM unnest(r_dst, r_seq, r_sent_at, r_version, r_src_addr, r_dst_addr, r_protocol,
                r_src_port, r_dst_port, r_length, r_fragment, r_payload)
         AS r (dst, seq, sent_at, version, src_addr, dst_addr, protocol, src_port, dst_port,
               length, fragment, payload);
    IF p_notify THEN
        PERFORM pg_notify('pgvpn_' || p.name, p_src || ':' || v.last)
        FROM unnest(l_dst, l_last) AS v (dst, last) JOIN pgvpn.peer p ON p.id = v.dst;
    END IF;
END
$$;

REVOKE INSERT ON pgvpn.packet FROM pgvpn_agent;
REVOKE UPDATE ON pgvpn.link FROM pgvpn_agent;
GRANT EXECUTE ON FUNCTION pgvpn.my_peer() TO pgvpn_agent, pgvpn_reader;

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
