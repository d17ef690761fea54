//! The staging table the good rows of a chunk are `COPY`ed into; [`crate::upsert`] reads
//! them from there.
//!
//! The table is declared once, in the `staging_table!` invocation below: the diesel table
//! `COPY` writes to, the row it copies (each column read from a [`UserRow`] by its
//! [`Column`], not by position), [`TEXT_COLUMNS`] and the `CREATE TEMP TABLE` statement all
//! come from that one list, so they cannot drift apart.

use std::sync::OnceLock;

use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt};
use mui_shared::domain::Column;

use crate::validate::UserRow;

/// Declares the staging table from one list of columns: `keys` and `rest` give each column's
/// diesel type, SQL type, Rust type and value (an expression of the row, named by `row`);
/// `text` gives the optional text columns by their [`Column`], in table order.
macro_rules! staging_table {
    (
        row = $row:ident;
        keys { $( $kcol:ident: [$($kdsl:tt)+], $ksql:literal, $kty:ty = $kval:expr; )+ }
        text { $( $tcol:ident = $tvar:ident, )+ }
        rest { $( $rcol:ident: [$($rdsl:tt)+], $rsql:literal, $rty:ty = $rval:expr; )+ }
    ) => {
        diesel::table! {
            /// Per-connection temporary table the good rows of a chunk are copied into.
            users_stage (row_no) {
                $( $kcol -> $($kdsl)+, )+
                $( $tcol -> Nullable<Text>, )+
                $( $rcol -> $($rdsl)+, )+
            }
        }

        /// One staged row, borrowed from its [`UserRow`].
        #[derive(Insertable)]
        #[diesel(table_name = users_stage)]
        #[diesel(treat_none_as_default_value = false)]
        struct StageRow<'a> {
            $( $kcol: $kty, )+
            $( $tcol: Option<&'a str>, )+
            $( $rcol: $rty, )+
        }

        impl<'a> StageRow<'a> {
            fn of($row: &'a UserRow) -> Self {
                StageRow {
                    $( $kcol: $kval, )+
                    $( $tcol: $row.value(Column::$tvar), )+
                    $( $rcol: $rval, )+
                }
            }
        }

        /// The optional text columns, in staging-table order: [`UserRow::text`] holds their
        /// values in this order, and the upsert writes them into `users` under these names.
        pub const TEXT_COLUMNS: [Column; [$(stringify!($tvar)),+].len()] = [$(Column::$tvar),+];

        /// Every staging column, in table order: its name and SQL type.
        const COLUMNS: &[(&str, &str)] = &[
            $( (stringify!($kcol), $ksql), )+
            $( (stringify!($tcol), "TEXT"), )+
            $( (stringify!($rcol), $rsql), )+
        ];

        /// The text columns' names as declared here, checked against their [`Column`]'s
        /// name by a test (the diesel table needs them spelled out).
        #[cfg(test)]
        const TEXT_NAMES: &[&str] = &[$(stringify!($tcol)),+];
    };
}

staging_table! {
    row = u;
    keys {
        // Spreadsheet row numbers stay far below i64::MAX.
        row_no: [Int8], "BIGINT PRIMARY KEY", RowNo = RowNo(u.row as i64);
        unique_id: [Text], "TEXT NOT NULL", &'a str = &u.unique_id;
        login_source: [Text], "TEXT NOT NULL", &'a str = &u.login_source;
    }
    text {
        first_name = FirstName,
        last_name = LastName,
        user_name = UserName,
        email = Email,
        street = Street,
        city = City,
        province = Province,
        postal_code = PostalCode,
        street2 = Street2,
        city2 = City2,
        state2 = State2,
        zip2 = Zip2,
        phone_cell = PhoneCell,
        user_type_id = UserTypeId,
        employ_no = EmployNo,
        employee_phone = EmployeePhone,
        student_no = StudentNo,
        student_phone = StudentPhone,
        drivers_license_num = DriversLicenseNum,
        drivers_license_prov = DriversLicenseProv,
    }
    rest {
        date_of_birth: [Nullable<Date>], "DATE", Option<chrono::NaiveDate> = u.date_of_birth;
        active: [Nullable<Bool>], "BOOLEAN", Option<bool> = u.active;
        // Not a column of the file: the digest of the row's values (`crate::digest`),
        // written into `users.row_digest` with them.
        row_digest: [Binary], "BYTEA NOT NULL", &'a [u8] = &u.digest;
    }
}

/// A staged row's spreadsheet row number: a `BIGINT` written as it is, and the place where
/// the fault tests' `worker.mid_copy` stop point sits (it is serialised while `COPY` sends
/// the chunk's rows; see [`mui_shared::failpoint`]).
#[derive(Debug, Clone, Copy, diesel::expression::AsExpression)]
#[diesel(sql_type = BigInt)]
struct RowNo(i64);

impl diesel::serialize::ToSql<BigInt, diesel::pg::Pg> for RowNo {
    fn to_sql<'b>(
        &'b self,
        out: &mut diesel::serialize::Output<'b, '_, diesel::pg::Pg>,
    ) -> diesel::serialize::Result {
        mui_shared::failpoint::stop("worker.mid_copy");
        <i64 as diesel::serialize::ToSql<BigInt, diesel::pg::Pg>>::to_sql(&self.0, out)
    }
}

/// `CREATE TEMP TABLE` for the staging table, from [`COLUMNS`]. The table lives as long as
/// the connection and is emptied at every commit, so a pooled connection creates it once.
pub(crate) fn create_statement() -> &'static str {
    static SQL: OnceLock<String> = OnceLock::new();
    SQL.get_or_init(|| {
        let columns: Vec<String> = COLUMNS.iter().map(|(c, t)| format!("{c} {t}")).collect();
        format!(
            "CREATE TEMP TABLE IF NOT EXISTS users_stage ({}) ON COMMIT DELETE ROWS",
            columns.join(", ")
        )
    })
}

/// Creates the staging table if this connection has none yet and `COPY`s `rows` into it:
/// two round trips, whatever the number of rows.
pub(crate) fn stage(conn: &mut PgConnection, rows: &[&UserRow]) -> QueryResult<()> {
    diesel::sql_query(create_statement()).execute(conn)?;
    let stage: Vec<StageRow<'_>> = rows.iter().map(|u| StageRow::of(u)).collect();
    diesel::copy_from(users_stage::table)
        .from_insertable(&stage)
        .execute(conn)?;
    Ok(())
}

/// Takes the rows whose user was written (or that lost to a later row) out of the staging
/// table, so the next statement of the upsert sees only the rows still to be written.
pub(crate) fn unstage(conn: &mut PgConnection, rows: &[i64]) -> QueryResult<()> {
    if !rows.is_empty() {
        diesel::sql_query(crate::sql::UNSTAGE)
            .bind::<Array<BigInt>, _>(rows)
            .execute(conn)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_columns_are_named_as_their_column() {
        let declared: Vec<&str> = TEXT_COLUMNS.iter().map(|c| c.name()).collect();
        assert_eq!(declared, TEXT_NAMES);
    }

    #[test]
    fn staging_columns_are_the_key_the_text_columns_and_the_rest() {
        let names: Vec<&str> = COLUMNS.iter().map(|(c, _)| *c).collect();
        let mut want = vec!["row_no", "unique_id", "login_source"];
        want.extend(TEXT_COLUMNS.iter().map(|c| c.name()));
        want.extend(["date_of_birth", "active", "row_digest"]);
        assert_eq!(names, want);
        // Every user column but `unique_id` and `login_source` is staged as the optional
        // value it is in `users`.
        let rest: Vec<Column> = Column::ALL
            .iter()
            .copied()
            .filter(|c| !Column::REQUIRED.contains(c))
            .collect();
        let staged: Vec<&str> = names[3..names.len() - 1].to_vec();
        assert_eq!(staged, rest.iter().map(|c| c.name()).collect::<Vec<_>>());
    }

    #[test]
    fn create_statement_is_pinned() {
        assert_eq!(
            create_statement(),
            "CREATE TEMP TABLE IF NOT EXISTS users_stage (row_no BIGINT PRIMARY KEY, \
             unique_id TEXT NOT NULL, login_source TEXT NOT NULL, first_name TEXT, \
             last_name TEXT, user_name TEXT, email TEXT, street TEXT, city TEXT, province TEXT, \
             postal_code TEXT, street2 TEXT, city2 TEXT, state2 TEXT, zip2 TEXT, \
             phone_cell TEXT, user_type_id TEXT, employ_no TEXT, employee_phone TEXT, \
             student_no TEXT, student_phone TEXT, drivers_license_num TEXT, \
             drivers_license_prov TEXT, date_of_birth DATE, active BOOLEAN, \
             row_digest BYTEA NOT NULL) \
             ON COMMIT DELETE ROWS"
        );
    }

    #[test]
    fn a_row_is_staged_by_column() {
        let values: Vec<String> = TEXT_COLUMNS
            .iter()
            .map(|column| format!("{column}-value"))
            .collect();
        let mut text: [Option<&str>; TEXT_COLUMNS.len()] = Default::default();
        for (slot, value) in text.iter_mut().zip(&values) {
            *slot = Some(value);
        }
        let user = UserRow {
            row: 7,
            unique_id: "u1",
            login_source: "LDAP",
            text,
            date_of_birth: None,
            active: Some(false),
            digest: [7; crate::digest::DIGEST_BYTES],
        };
        let staged = StageRow::of(&user);
        assert_eq!(staged.row_no.0, 7);
        assert_eq!(staged.email, Some("email-value"));
        assert_eq!(staged.user_name, Some("user_name-value"));
        assert_eq!(
            staged.drivers_license_prov,
            Some("drivers_license_prov-value")
        );
        assert_eq!(staged.active, Some(false));
        assert_eq!(staged.row_digest, &[7; crate::digest::DIGEST_BYTES]);
    }
}
