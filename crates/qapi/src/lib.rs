//! qapi: the schema in `qapi-schema/`, argument checking, introspection and typed commands.
