-- The PostgreSQL role pgwarden logs in with: the least it needs to enforce PostgresPolicy objects.
--
-- Run it once on every PostgreSQL server pgwarden enforces on (on a streaming-replication cluster, on
-- the primary only: roles replicate), as a superuser (granting predefined roles and ALTER SYSTEM needs one):
--     psql -h <host> -U postgres -d postgres -v ON_ERROR_STOP=1 -f pgwarden-role.sql
-- then give the role a password without writing it into a file or your shell history:
--     psql -h <host> -U postgres -d postgres -c '\password pgwarden'
-- and put the same password in the Secret your policies name (credentials-secret.yaml).
-- On CloudNativePG, declare the role in the Cluster instead (see cloudnativepg-primary.yaml).
--
-- Works on PostgreSQL 15 and later. tests/e2e/test_manifests.py runs this script, optional section
-- included, against real servers and then enforces policies with the role it creates.

-- LOGIN and nothing else: not SUPERUSER, CREATEDB, CREATEROLE, REPLICATION or BYPASSRLS, and it owns no
-- objects. Because it is not a superuser, PostgreSQL itself refuses to let it signal superusers' sessions.
-- It connects to the database named in the policy (spec.connection.database, `postgres` by default);
-- if you revoked CONNECT from PUBLIC there, also: GRANT CONNECT ON DATABASE postgres TO pgwarden;
CREATE ROLE pgwarden WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;

-- Lets pg_cancel_backend() and pg_terminate_backend() act on other roles' sessions (never on a
-- superuser's). This is what every session rule (terminate / cancel) and every connection limit calls.
GRANT pg_signal_backend TO pgwarden;

-- Lets pgwarden see every session in pg_stat_activity. Without it, other roles' rows hide their state,
-- query, application and timestamps, so pgwarden could neither tell idle from active nor measure ages.
-- Read-only: it grants no access to any table's data.
GRANT pg_read_all_stats TO pgwarden;

-- ---------------------------------------------------------------------------------------------------
-- Optional: only for policies that set spec.autovacuum (the autovacuum cap). Remove the leading "-- "
-- of the statements you need. Without them pgwarden reports, in the policy's status and Events, which
-- GRANT is missing, and changes nothing.
--
-- Write autovacuum_max_workers with ALTER SYSTEM (into postgresql.auto.conf), this one setting only:
-- GRANT ALTER SYSTEM ON PARAMETER autovacuum_max_workers TO pgwarden;
--
-- Ask the server to re-read its configuration after writing. PostgreSQL 18 applies the new cap at once
-- (up to autovacuum_worker_slots); earlier versions only at their next restart, which pgwarden never does.
-- GRANT EXECUTE ON FUNCTION pg_catalog.pg_reload_conf() TO pgwarden;
--
-- Read back what is written in the configuration files, so that deleting the policy resets the setting
-- only while it still holds the value pgwarden wrote (never a value someone set after it):
-- GRANT SELECT ON pg_catalog.pg_file_settings TO pgwarden;
-- GRANT EXECUTE ON FUNCTION pg_catalog.pg_show_all_file_settings() TO pgwarden;
--
-- PostgreSQL 18 and later, for spec.autovacuum.cancelExcessWorkers: stop autovacuum workers running above
-- the cap (pg_signal_backend does not cover autovacuum workers; before 18 only a superuser can signal them):
-- GRANT pg_signal_autovacuum_worker TO pgwarden;
