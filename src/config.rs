//! Run configuration (TOML), every field overridable from the command line, validated with errors
//! that name the field.
