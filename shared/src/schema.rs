//! Diesel table definitions, kept by hand in step with `migrations/`.

diesel::table! {
    tenants (id) {
        id -> Int8,
        slug -> Varchar,
        name -> Text,
        reply_to_email -> Nullable<Text>,
        failed_import_emails -> Array<Text>,
        archive_on_inactive -> Bool,
        created_at -> Timestamptz,
        archive_suffix_fields -> Array<Text>,
        guard_percent -> Int4,
        guard_min_users -> Int4,
        success_mail -> Bool,
        header_aliases -> Jsonb,
        region -> Nullable<Text>,
    }
}

diesel::table! {
    login_sources (tenant_id, name) {
        tenant_id -> Int8,
        name -> Varchar,
    }
}

diesel::table! {
    user_types (tenant_id, type_id) {
        tenant_id -> Int8,
        type_id -> Varchar,
        name -> Text,
    }
}

diesel::table! {
    users (tenant_id, unique_id) {
        tenant_id -> Int8,
        unique_id -> Varchar,
        login_source -> Varchar,
        first_name -> Nullable<Varchar>,
        last_name -> Nullable<Varchar>,
        user_name -> Nullable<Varchar>,
        email -> Nullable<Varchar>,
        street -> Nullable<Varchar>,
        city -> Nullable<Varchar>,
        province -> Nullable<Varchar>,
        postal_code -> Nullable<Varchar>,
        street2 -> Nullable<Varchar>,
        city2 -> Nullable<Varchar>,
        state2 -> Nullable<Varchar>,
        zip2 -> Nullable<Varchar>,
        phone_cell -> Nullable<Varchar>,
        user_type_id -> Nullable<Varchar>,
        employ_no -> Nullable<Varchar>,
        employee_phone -> Nullable<Varchar>,
        student_no -> Nullable<Varchar>,
        student_phone -> Nullable<Varchar>,
        drivers_license_num -> Nullable<Varchar>,
        drivers_license_prov -> Nullable<Varchar>,
        date_of_birth -> Nullable<Date>,
        active -> Bool,
        archived_at -> Nullable<Timestamptz>,
        last_file_id -> Int8,
        last_row -> Int8,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
        archive_suffix -> Nullable<Varchar>,
        row_digest -> Nullable<Bytea>,
    }
}

diesel::table! {
    permits (id) {
        id -> Int8,
        tenant_id -> Int8,
        unique_id -> Varchar,
        permit_number -> Varchar,
        lot_name -> Text,
        active_window -> Nullable<Text>,
        state -> Varchar,
        released_at -> Nullable<Timestamptz>,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    import_files (id) {
        id -> Int8,
        tenant_id -> Int8,
        file_name -> Text,
        arrival_key -> Text,
        size_bytes -> Int8,
        sha256 -> Varchar,
        state -> Varchar,
        encoding -> Nullable<Varchar>,
        delimiter -> Nullable<Varchar>,
        header -> Nullable<Jsonb>,
        ignored_columns -> Nullable<Jsonb>,
        total_chunks -> Nullable<Int4>,
        chunks_done -> Int4,
        rows_total -> Nullable<Int8>,
        rows_inserted -> Int8,
        rows_updated -> Int8,
        rows_unchanged -> Int8,
        rows_superseded -> Int8,
        rows_failed -> Int8,
        error_code -> Nullable<Varchar>,
        error_message -> Nullable<Text>,
        archived_name -> Nullable<Text>,
        notify_status -> Varchar,
        notify_detail -> Nullable<Text>,
        received_at -> Timestamptz,
        queued_at -> Nullable<Timestamptz>,
        finished_at -> Nullable<Timestamptz>,
        notified_at -> Nullable<Timestamptz>,
        users_archived -> Int8,
        users_reactivated -> Int8,
        permits_released -> Int8,
        chunk_rows -> Nullable<Int4>,
        chunk_max_bytes -> Nullable<Int4>,
        notices -> Array<Text>,
        trace_id -> Nullable<Text>,
        trace_context -> Nullable<Jsonb>,
        dry_run -> Bool,
        hold -> Nullable<Text>,
        hold_users -> Nullable<Int8>,
        hold_active_users -> Nullable<Int8>,
        hold_decided_at -> Nullable<Timestamptz>,
        hold_decided_by -> Nullable<Text>,
        hold_notified_at -> Nullable<Timestamptz>,
        hold_notice_claimed_until -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    /// The users a held file would deactivate or archive.
    file_deactivations (file_id, unique_id) {
        file_id -> Int8,
        unique_id -> Text,
    }
}

diesel::table! {
    drop_folder_status (tenant_id) {
        tenant_id -> Int8,
        path -> Text,
        problem -> Nullable<Text>,
        since -> Timestamptz,
    }
}

diesel::table! {
    chunk_queue (tenant_id, file_id, chunk_no) {
        tenant_id -> Int8,
        file_id -> Int8,
        chunk_no -> Int4,
        rows -> Int4,
        payload -> Bytea,
        queued_at -> Timestamptz,
        dispatched_at -> Nullable<Timestamptz>,
        confirmed -> Bool,
        dead_at -> Nullable<Timestamptz>,
        held -> Bool,
    }
}

diesel::table! {
    workers (name) {
        name -> Text,
        host -> Text,
        pid -> Int4,
        concurrency -> Int4,
        started_at -> Timestamptz,
        seen_at -> Timestamptz,
    }
}

diesel::table! {
    file_chunks (file_id, chunk_no) {
        file_id -> Int8,
        chunk_no -> Int4,
        rows -> Int4,
        failed -> Int4,
        done_at -> Timestamptz,
    }
}

diesel::table! {
    row_failures (file_id, row_number) {
        file_id -> Int8,
        row_number -> Int8,
        fields -> Jsonb,
        errors -> Jsonb,
    }
}

diesel::table! {
    outbox (id) {
        id -> Int8,
        queue -> Varchar,
        payload -> Bytea,
        created_at -> Timestamptz,
        claimed_until -> Nullable<Timestamptz>,
        trace_context -> Nullable<Jsonb>,
    }
}

diesel::table! {
    /// Messages dead-lettered by RabbitMQ, as recorded by the notifier.
    dead_letters (id) {
        id -> Int8,
        queue -> Nullable<Varchar>,
        source_queue -> Text,
        tenant_id -> Nullable<Int8>,
        file_id -> Nullable<Int8>,
        chunk_no -> Nullable<Int4>,
        reason -> Text,
        last_error -> Nullable<Text>,
        attempts -> Int4,
        died_at -> Timestamptz,
        recorded_at -> Timestamptz,
        payload -> Bytea,
        payload_sha256 -> Bytea,
        replayed_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    /// The last error noted for a message, by payload hash, until it succeeds or dies.
    message_errors (payload_sha256, queue) {
        payload_sha256 -> Bytea,
        queue -> Varchar,
        file_id -> Nullable<Int8>,
        error -> Text,
        failures -> Int4,
        noted_at -> Timestamptz,
    }
}

diesel::joinable!(login_sources -> tenants (tenant_id));
diesel::joinable!(user_types -> tenants (tenant_id));
diesel::joinable!(users -> tenants (tenant_id));
diesel::joinable!(import_files -> tenants (tenant_id));
diesel::joinable!(drop_folder_status -> tenants (tenant_id));
diesel::joinable!(file_chunks -> import_files (file_id));
diesel::joinable!(row_failures -> import_files (file_id));

diesel::allow_tables_to_appear_in_same_query!(
    tenants,
    login_sources,
    user_types,
    users,
    permits,
    import_files,
    file_chunks,
    row_failures,
    outbox,
    drop_folder_status,
    chunk_queue,
    workers,
    file_deactivations,
);
