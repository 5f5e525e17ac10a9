-- The caller's peer id, planned once per session instead of once per statement.
--
-- As a SQL function my_peer() was parsed and planned again in every statement that called it:
-- every send_batch(), every receiver fetch and cursor save (through the row-level security
-- policies). A PL/pgSQL body keeps its plan for the session; in the lab a call went from about
-- 240 to 150 us, most of a small ACK batch's own cost. Same signature, same result.
CREATE OR REPLACE FUNCTION pgvpn.my_peer()
RETURNS smallint
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pgvpn
AS $$
BEGIN
    RETURN (SELECT id FROM pgvpn.peer WHERE db_role = session_user);
END
$$;
