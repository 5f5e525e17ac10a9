-- Schema v12: faults that must not take a tunnel down (partitions made without stalling the
-- log, peers removed as an operation, the database's own limits bounded).

-- == partitions ==
-- A new day no longer takes the log's ACCESS EXCLUSIVE lock. CREATE TABLE ... PARTITION OF
-- needs it on pgvpn.packet, so it queues behind any reader (a pg_dump, a long `pgvpn log`) and
-- every insert and fetch queues behind it. The day is now made as a table of its own, with a
-- CHECK constraint that proves its bounds, and attached: ATTACH PARTITION takes SHARE UPDATE
-- EXCLUSIVE on pgvpn.packet, which inserts, fetches and readers do not conflict with, and skips
-- the scan of the new table. It still locks packet_default (to narrow its range; the CHECK on
-- the new day makes the scan of packet_default a formality only when it is empty): inserts never
-- touch packet_default, a receiver's fetch waits at most lock_timeout, and the day is retried at
-- the next run (housekeeping: within a minute). Dropping a day (apply_retention) keeps the
-- parent's lock with a 200 ms lock_timeout: DETACH ... CONCURRENTLY is refused while a default
-- partition exists, and the default partition is what keeps packets when days are missing.
CREATE OR REPLACE FUNCTION pgvpn.ensure_partitions(days_ahead integer DEFAULT 7)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgvpn, pg_temp
SET lock_timeout = '200ms'
AS $$
DECLARE
    today date := (now() AT TIME ZONE 'UTC')::date;
    d date;
    part text;
    lo timestamptz;
    hi timestamptz;
    created integer := 0;
BEGIN
    IF days_ahead IS NULL OR days_ahead NOT BETWEEN 0 AND 31 THEN
        RAISE EXCEPTION 'pgvpn: ensure_partitions makes 0 to 31 days ahead'
            USING ERRCODE = 'PV003';
    END IF;
    PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('pgvpn.ensure_partitions'));
    FOR i IN 0..days_ahead LOOP
        d := today + i;
        part := 'packet_' || to_char(d, 'YYYYMMDD');
        CONTINUE WHEN to_regclass('pgvpn.' || part) IS NOT NULL;
        lo := d::timestamp AT TIME ZONE 'UTC';
        hi := (d + 1)::timestamp AT TIME ZONE 'UTC';
        BEGIN
            EXECUTE format('CREATE TABLE pgvpn.%I (LIKE pgvpn.packet INCLUDING DEFAULTS '
                           'INCLUDING STORAGE INCLUDING COMPRESSION, CONSTRAINT %I '
                           'CHECK (logged_at >= %L AND logged_at < %L))',
                           part, part || '_bounds', lo, hi);
            EXECUTE format('ALTER TABLE pgvpn.%I ALTER COLUMN payload SET STORAGE EXTERNAL',
                           part);
            EXECUTE format('ALTER TABLE pgvpn.packet ATTACH PARTITION pgvpn.%I '
                           'FOR VALUES FROM (%L) TO (%L)', part, lo, hi);
            PERFORM pgvpn.hide_statistics(format('pgvpn.%I', part)::regclass);
            created := created + 1;
        EXCEPTION WHEN check_violation THEN
            RAISE WARNING 'pgvpn: partition % not created, rows for it are in packet_default',
                part;
        END;
    END LOOP;
    RETURN created;
END
$$;

-- == failover ==
-- The timeline of the server an agent is connected to: it goes up at every promotion (a
-- failover, a switchover), never at a restart in place. A sender that lost its connection in the
-- middle of a batch learns the batch's fate from the link's tx_seq; on the same timeline that is
-- the whole truth, but after a promotion the batch may have been committed and read on the old
-- primary and never reached the new one: it is in doubt (sender.py). A peer learns the number
-- only: pg_current_wal_lsn() itself would tell it how much the whole cluster writes.
CREATE FUNCTION pgvpn.timeline()
RETURNS integer
LANGUAGE sql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pgvpn, pg_temp
AS $$
    SELECT ('x' || substr(pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_lsn()), 1, 8))
           ::bit(32)::integer
$$;
COMMENT ON FUNCTION pgvpn.timeline() IS
    'The current timeline of this server (up by one at every promotion).';
REVOKE ALL ON FUNCTION pgvpn.timeline() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgvpn.timeline() TO pgvpn_agent, pgvpn_reader;

-- == peer removal ==
-- A peer leaves for good (`pgvpn db remove`, playbooks/remove-peer.yml): its links and cursors
-- go, both ways, and its login role with them (admin.py, as a superuser). Its pgvpn.peer row
-- stays, marked removed and revoked, and so does every row of the log it sent or received, with
-- the advances recorded on its links. A name registered again keeps its id and each of its links
-- continues where that pair's sequence stopped: a link restarting at seq 1 would give the log two
-- rows with the same (src_peer, dst_peer, seq), and a receiver whose cursor is past them, or
-- `pgvpn log`, would take the new rows for the old. Where each sequence stopped is kept in
-- pgvpn.link_retired, one row per removed link, until the link is made again: no scan of the log.
ALTER TABLE pgvpn.peer ADD COLUMN removed_at timestamptz;
COMMENT ON COLUMN pgvpn.peer.removed_at IS
    'Set by `pgvpn db remove`: links, cursors and login role gone, rows kept; revoked_at is set '
    'with it. Registering the name again clears both, unless it was revoked before its removal.';

CREATE TABLE pgvpn.link_retired (
    src smallint NOT NULL REFERENCES pgvpn.peer (id),
    dst smallint NOT NULL REFERENCES pgvpn.peer (id),
    tx_seq bigint NOT NULL,
    retired_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (src, dst)
);
COMMENT ON TABLE pgvpn.link_retired IS
    'Links of removed peers: the sequence each stopped at, where register_peers() restarts it.';

-- An advance stays on record after its link is gone: it explains a hole in rows that stay.
ALTER TABLE pgvpn.link_advance DROP CONSTRAINT link_advance_src_dst_fkey,
    ADD FOREIGN KEY (src) REFERENCES pgvpn.peer (id),
    ADD FOREIGN KEY (dst) REFERENCES pgvpn.peer (id);

-- The owner deletes links only of a removed peer (row-level security is forced: no definer
-- function can delete any other); their cursors go with them. Deleting the link first and the
-- cursor by cascade takes the two row locks in send_batch()'s order (link, then the cursors a
-- batch carries): deleting the cursors first deadlocked with a batch of a peer in mid-send.
CREATE POLICY owner_removes ON pgvpn.link FOR DELETE TO pgvpn_owner
    USING (EXISTS (SELECT FROM pgvpn.peer p WHERE p.id IN (src, dst) AND p.removed_at IS NOT NULL));
ALTER TABLE pgvpn.cursor DROP CONSTRAINT cursor_src_dst_fkey,
    ADD CONSTRAINT cursor_src_dst_fkey FOREIGN KEY (src, dst) REFERENCES pgvpn.link (src, dst)
        ON DELETE CASCADE;

-- Idempotent; returns the peer's login role, which the caller (a superuser) drops. The link rows
-- are deleted with RETURNING: a sender's batch in flight on one of them commits first, and the
-- sequence kept is the one it left.
CREATE FUNCTION pgvpn.remove_peer(p_name text)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgvpn, pg_temp
SET lock_timeout = '2s'
AS $$
DECLARE
    victim pgvpn.peer;
BEGIN
    IF p_name IS NULL OR length(p_name) > 50 THEN
        RAISE EXCEPTION 'pgvpn: remove_peer takes the name of one peer' USING ERRCODE = 'PV003';
    END IF;
    -- one change to the set of peers at a time (register_peers() takes it too)
    PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('pgvpn.register_peers'));
    UPDATE pgvpn.peer p SET removed_at = coalesce(p.removed_at, now()),
                            revoked_at = coalesce(p.revoked_at, now())
    WHERE p.name = p_name
    RETURNING p.* INTO victim;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgvpn: no peer named % in pgvpn.peer', p_name USING ERRCODE = 'PV003';
    END IF;
    WITH gone AS (
        DELETE FROM pgvpn.link l WHERE victim.id IN (l.src, l.dst) RETURNING l.src, l.dst, l.tx_seq
    )
    INSERT INTO pgvpn.link_retired AS r (src, dst, tx_seq) SELECT g.src, g.dst, g.tx_seq FROM gone g
    ON CONFLICT (src, dst) DO UPDATE
        SET tx_seq = greatest(r.tx_seq, excluded.tx_seq), retired_at = excluded.retired_at;
    DELETE FROM pgvpn.agent_session s WHERE s.peer = victim.id;
    RETURN victim.db_role;
END
$$;

-- As schema v11, and: a removed peer named again is restored (a new secret channel: the old one
-- was known to its old host) unless it had been revoked before it was removed, which takes an
-- operator clearing revoked_at; its links continue from pgvpn.link_retired, and a new cursor
-- starts where its link does, after everything an earlier incarnation of the link logged.
CREATE OR REPLACE FUNCTION pgvpn.register_peers(names text[])
RETURNS TABLE (name text, id smallint)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgvpn, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    IF names IS NULL OR cardinality(names) > 1000 OR array_position(names, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'pgvpn: register_peers takes 1 to 1000 names, none NULL'
            USING ERRCODE = 'PV003';
    END IF;
    PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('pgvpn.register_peers'));
    UPDATE pgvpn.peer p SET removed_at = NULL, revoked_at = NULL, channel = DEFAULT
    WHERE p.name = ANY (names) AND p.removed_at IS NOT NULL
      AND (p.revoked_at IS NULL OR p.revoked_at >= p.removed_at);
    INSERT INTO pgvpn.peer (name)
        SELECT DISTINCT n FROM unnest(names) AS n
        WHERE NOT EXISTS (SELECT FROM pgvpn.peer p WHERE p.name = n)
        ON CONFLICT DO NOTHING;
    INSERT INTO pgvpn.link (src, dst, tx_seq)
        SELECT a.id, b.id, coalesce(r.tx_seq, 0)
        FROM pgvpn.peer a CROSS JOIN pgvpn.peer b
        LEFT JOIN pgvpn.link_retired r ON r.src = a.id AND r.dst = b.id
        WHERE a.id <> b.id AND (a.name = ANY (names) OR b.name = ANY (names))
          AND a.revoked_at IS NULL AND b.revoked_at IS NULL
        ON CONFLICT DO NOTHING;
    INSERT INTO pgvpn.cursor (src, dst, rx_seq) SELECT l.src, l.dst, l.tx_seq FROM pgvpn.link l
        ON CONFLICT DO NOTHING;
    DELETE FROM pgvpn.link_retired r USING pgvpn.link l WHERE l.src = r.src AND l.dst = r.dst;
    INSERT INTO pgvpn.usage (peer) SELECT p.id FROM pgvpn.peer p ON CONFLICT DO NOTHING;
    RETURN QUERY SELECT p.name, p.id FROM pgvpn.peer p WHERE p.name = ANY (names);
END
$$;

COMMENT ON FUNCTION pgvpn.remove_peer(text) IS
    'Removes a peer: its links (their sequences kept in link_retired) and cursors, both ways; '
    'returns its login role, for a superuser to drop (`pgvpn db remove`).';
REVOKE ALL ON FUNCTION pgvpn.remove_peer(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgvpn.remove_peer(text) TO pgvpn_operator;
GRANT SELECT ON pgvpn.link_retired TO pgvpn_reader;
GRANT SELECT (removed_at) ON pgvpn.peer TO pgvpn_reader;

-- == database limits ==
-- A closed day of the log is frozen once, soon after it closes, and never written again. Left
-- to autovacuum, a day's rows are frozen only by the anti-wraparound vacuum that comes when its
-- relfrozenxid is autovacuum_freeze_max_age transactions old (200M: two or three days at a
-- thousand batches a second): it writes every page of the day a second time, and days that
-- aged together come due together. Instead housekeeping marks the newest closed day that has
-- its indexes (index_closed_days(): the freezing vacuum, which no lock request cancels, would
-- hold up their creation): its storage parameters ask autovacuum to vacuum it within 100k
-- transactions, aggressively (all-visible pages too: the day's own vacuums made most of them
-- so), and to freeze every row. Once its relfrozenxid, and its TOAST table's, is newer
-- than the transaction that marked it (the xmin of its pg_class row, which vacuum updates in
-- place), no unfrozen row is left, the visibility map says so, and the mark is lifted: later
-- anti-wraparound vacuums of that day skip every page. autovacuum_freeze_min_age = 0 stays as
-- the sign that the day is done. One day at a time: the backlog of an upgraded database is
-- frozen in turn, not all at once. (Only a table's owner may VACUUM, and not in a function:
-- autovacuum does the work, as the owner's storage parameters ask.)
CREATE FUNCTION pgvpn.freeze_closed_days()
RETURNS TABLE (partition text, day date, state text, bytes bigint, xid_age integer)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgvpn, pg_temp
SET lock_timeout = '200ms'
AS $$
DECLARE
    today date := (now() AT TIME ZONE 'UTC')::date;
    p record;
    freezing boolean;
BEGIN
    IF NOT pg_catalog.pg_try_advisory_xact_lock(pg_catalog.hashtext('pgvpn.freeze_closed_days'))
    THEN
        RETURN;
    END IF;
    FOR p IN
        SELECT d.*, coalesce(bool_or(d.marked AND NOT d.frozen) OVER (), false) AS freezing
        FROM (SELECT t.partition, t.day, t.bytes,
                     greatest(pg_catalog.age(c.relfrozenxid), pg_catalog.age(x.relfrozenxid))
                         AS xid_age,
                     NOT EXISTS (SELECT FROM unnest(ARRAY['src_addr', 'dst_addr', 'src_port',
                                                          'dst_port']) AS col
                                 WHERE to_regclass(format('pgvpn.%I', t.partition || '_' || col))
                                       IS NULL) AS indexed,
                     'autovacuum_freeze_max_age=100000' = ANY (c.reloptions) AS marked,
                     'autovacuum_freeze_min_age=0' = ANY (c.reloptions) AS done,
                     pg_catalog.age(c.relfrozenxid) < pg_catalog.age(c.xmin)
                     AND (x.oid IS NULL OR pg_catalog.age(x.relfrozenxid) < pg_catalog.age(c.xmin))
                         AS frozen
              FROM pgvpn.partitions() t
              JOIN pg_catalog.pg_class c ON c.oid = format('pgvpn.%I', t.partition)::regclass
              LEFT JOIN pg_catalog.pg_class x ON x.oid = c.reltoastrelid
              WHERE t.day < today) d
        ORDER BY d.day DESC
    LOOP
        freezing := coalesce(freezing, p.freezing);
        partition := p.partition;
        day := p.day;
        bytes := p.bytes;
        xid_age := p.xid_age;
        BEGIN
            IF p.marked AND p.frozen THEN
                EXECUTE format('ALTER TABLE pgvpn.%I RESET (autovacuum_freeze_max_age, '
                               'autovacuum_freeze_table_age, toast.autovacuum_freeze_max_age, '
                               'toast.autovacuum_freeze_table_age)', p.partition);
                state := 'frozen';
            ELSIF p.marked THEN
                state := 'freezing';
            ELSIF p.done THEN
                state := 'done';
            ELSIF p.indexed AND NOT freezing THEN
                EXECUTE format('ALTER TABLE pgvpn.%I SET (autovacuum_freeze_min_age = 0, '
                               'autovacuum_freeze_max_age = 100000, '
                               'autovacuum_freeze_table_age = 0, '
                               'toast.autovacuum_freeze_min_age = 0, '
                               'toast.autovacuum_freeze_max_age = 100000, '
                               'toast.autovacuum_freeze_table_age = 0)', p.partition);
                freezing := true;
                state := 'marked';
            ELSE
                state := 'waiting';
            END IF;
        EXCEPTION WHEN lock_not_available THEN
            -- autovacuum is at it (its lock conflicts with ALTER TABLE's): next time
            state := CASE WHEN p.marked THEN 'freezing' ELSE 'waiting' END;
        END;
        RETURN NEXT;
    END LOOP;
END
$$;
COMMENT ON FUNCTION pgvpn.freeze_closed_days() IS
    'Has autovacuum freeze each closed day of the log once, newest first, one at a time; '
    'returns every closed day''s state: waiting, marked, freezing, frozen (just now), done.';
REVOKE ALL ON FUNCTION pgvpn.freeze_closed_days() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgvpn.freeze_closed_days() TO pgvpn_operator;
