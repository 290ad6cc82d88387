-- The services' PostgreSQL role: a login that owns the waferwatch database and is not a superuser.
--
-- The postgres image runs this once, on the first start with an empty data volume
-- (/docker-entrypoint-initdb.d), through psql as POSTGRES_USER (the administrator) in POSTGRES_DB. Why a
-- role of its own: a superuser reaches the database server's files and programs (COPY ... TO PROGRAM,
-- pg_read_file) whatever the application checks, so the services must never log in as one (issue 12,
-- row 9). The values come from the postgres service's environment in docker-compose.yml:
--   WAFERWATCH_APP_ROLE      the role every WAFERWATCH_DATABASE_URL logs in as (waferwatch)
--   WAFERWATCH_APP_PASSWORD  its password (POSTGRES_PASSWORD in .env)
-- The read-only role of `waferwatch report sql` is made later, by `waferwatch db create-reader` in the
-- migrate service: it grants on our tables, which exist only after the migrations.
\set ON_ERROR_STOP on
\getenv app_role WAFERWATCH_APP_ROLE
\getenv app_password WAFERWATCH_APP_PASSWORD
\if :{?app_role}
\else
  \set app_role ''
\endif
\if :{?app_password}
\else
  \set app_password ''
\endif
SELECT :'app_role' = '' OR :'app_password' = '' AS missing_settings \gset
\if :missing_settings
  DO $$ BEGIN RAISE EXCEPTION '01-roles.sql: set WAFERWATCH_APP_ROLE and WAFERWATCH_APP_PASSWORD (docker-compose.yml, service postgres; POSTGRES_PASSWORD in .env)'; END $$;
\endif

CREATE ROLE :"app_role" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS PASSWORD :'app_password';
-- The owner of the database owns its public schema's rights (PostgreSQL 15+: pg_database_owner), so the
-- migrations, run as this role, create the tables, and this role owns them.
ALTER DATABASE :"DBNAME" OWNER TO :"app_role";
