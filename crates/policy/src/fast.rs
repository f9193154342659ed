//! A fast reader for the common shape of account files: bare keys, `[accounts.ID]`,
//! `[[accounts.ID.licenses]]`, `[accounts.ID.licenses.overrides]`, `[accounts.ID.users.U]`
//! and `[accounts.ID.groups]` headers, and one-line values (strings without escapes, whole
//! numbers, booleans, dates, arrays and inline tables). It builds the same `AccountsFile` the
//! `toml` crate would, with the same spans, ten times faster. It never reports a mistake:
//! anything outside that shape, or anything the `toml` crate would refuse or read
//! differently (a duplicate key, an unknown field, a value of the wrong type), makes it give
//! up with `None`, and the caller parses the file with the `toml` crate, which then reports
//! what is wrong with its line. Pure: no I/O.

use std::collections::BTreeMap;
use std::ops::Range;

use toml::Spanned;

use crate::{AccountFile, AccountsFile, LicenseFile, OverridesFile, UserFile};

/// A value and where it is.
type Located = (Range<usize>, Value);

/// A value as written, before it is matched to the field that holds it.
enum Value {
    String(String),
    Integer(i64),
    Boolean(bool),
    Datetime(toml::value::Datetime),
    Array(Vec<Located>),
    Table(Vec<(Spanned<String>, Located)>),
}

impl Value {
    fn into_toml(self) -> Option<toml::Value> {
        Some(match self {
            Value::String(text) => toml::Value::String(text),
            Value::Integer(number) => toml::Value::Integer(number),
            Value::Boolean(flag) => toml::Value::Boolean(flag),
            Value::Datetime(datetime) => toml::Value::Datetime(datetime),
            Value::Array(items) => toml::Value::Array(items.into_iter().map(|(_, item)| item.into_toml()).collect::<Option<_>>()?),
            Value::Table(entries) => {
                let mut table = toml::Table::new();
                for (key, (_, value)) in entries {
                    if table.insert(key.into_inner(), value.into_toml()?).is_some() {
                        return None;
                    }
                }
                toml::Value::Table(table)
            }
        })
    }
}

struct Cursor<'a> {
    bytes: &'a [u8],
    text: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn skip_spaces(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.pos += 1;
        }
    }

    fn eat(&mut self, byte: u8) -> bool {
        if self.peek() == Some(byte) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    /// Spaces, an optional comment, then the end of the line (or of the text).
    fn end_of_line(&mut self) -> Option<()> {
        self.skip_spaces();
        if self.eat(b'#') {
            while let Some(byte) = self.peek() {
                if byte == b'\n' {
                    break;
                }
                // Control characters in comments are refused by the `toml` crate.
                if byte < 0x20 && byte != b'\t' || byte == 0x7f {
                    return None;
                }
                self.pos += 1;
            }
        }
        match self.peek() {
            None => Some(()),
            Some(b'\n') => {
                self.pos += 1;
                Some(())
            }
            Some(_) => None,
        }
    }

    fn bare_key(&mut self) -> Option<Spanned<String>> {
        let start = self.pos;
        while matches!(self.peek(), Some(b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-')) {
            self.pos += 1;
        }
        if self.pos == start {
            return None;
        }
        Some(Spanned::new(start..self.pos, self.text.get(start..self.pos)?.to_string()))
    }

    /// `[a.b.c]` or `[[a.b.c]]` (the cursor on the first `[`): the keys and whether it is an
    /// array of tables.
    fn header(&mut self) -> Option<(Vec<Spanned<String>>, bool, Range<usize>)> {
        let start = self.pos;
        self.pos += 1;
        let array = self.eat(b'[');
        let mut keys = Vec::with_capacity(4);
        loop {
            self.skip_spaces();
            keys.push(self.bare_key()?);
            self.skip_spaces();
            if !self.eat(b'.') {
                break;
            }
        }
        if !self.eat(b']') || array && !self.eat(b']') {
            return None;
        }
        let span = start..self.pos;
        self.end_of_line()?;
        Some((keys, array, span))
    }

    fn value(&mut self) -> Option<(Range<usize>, Value)> {
        let start = self.pos;
        let value = match self.peek()? {
            b'"' => {
                self.pos += 1;
                let content = self.pos;
                loop {
                    match self.peek()? {
                        b'"' => break,
                        // Escapes and control characters are left to the `toml` crate.
                        b'\\' | b'\n' | b'\r' | 0x7f => return None,
                        byte if byte < 0x20 && byte != b'\t' => return None,
                        _ => self.pos += 1,
                    }
                }
                let text = self.text.get(content..self.pos)?.to_string();
                self.pos += 1;
                // `"""` starts a multi-line string.
                if text.is_empty() && self.peek() == Some(b'"') {
                    return None;
                }
                Value::String(text)
            }
            b'[' => {
                self.pos += 1;
                let mut items = Vec::new();
                loop {
                    self.skip_spaces();
                    if self.eat(b']') {
                        break;
                    }
                    items.push(self.value()?);
                    self.skip_spaces();
                    if self.eat(b',') {
                        continue;
                    }
                    self.skip_spaces();
                    if !self.eat(b']') {
                        return None;
                    }
                    break;
                }
                Value::Array(items)
            }
            b'{' => {
                self.pos += 1;
                let mut entries = Vec::new();
                self.skip_spaces();
                if !self.eat(b'}') {
                    loop {
                        self.skip_spaces();
                        let key = self.bare_key()?;
                        self.skip_spaces();
                        if !self.eat(b'=') {
                            return None;
                        }
                        self.skip_spaces();
                        let value = self.value()?;
                        entries.push((key, value));
                        self.skip_spaces();
                        if self.eat(b',') {
                            continue;
                        }
                        if !self.eat(b'}') {
                            return None;
                        }
                        break;
                    }
                }
                Value::Table(entries)
            }
            b't' if self.bytes.get(self.pos..self.pos + 4) == Some(b"true") => {
                self.pos += 4;
                Value::Boolean(true)
            }
            b'f' if self.bytes.get(self.pos..self.pos + 5) == Some(b"false") => {
                self.pos += 5;
                Value::Boolean(false)
            }
            b'-' | b'0'..=b'9' => {
                while matches!(self.peek(), Some(b'0'..=b'9' | b'-' | b':' | b'.' | b'+' | b'T' | b'Z' | b't' | b'z')) {
                    self.pos += 1;
                }
                let token = self.text.get(start..self.pos)?;
                let digits = token.strip_prefix('-').unwrap_or(token);
                if !digits.is_empty() && digits.bytes().all(|byte| byte.is_ascii_digit()) {
                    // Leading zeros are refused by TOML.
                    if digits.len() > 1 && digits.starts_with('0') {
                        return None;
                    }
                    Value::Integer(token.parse().ok()?)
                } else if token.len() >= 10 && token.as_bytes().get(4) == Some(&b'-') {
                    // A space between date and time is TOML too, but left to the `toml` crate.
                    if self.peek() == Some(b' ') && self.bytes.get(self.pos + 1).is_some_and(u8::is_ascii_digit) {
                        return None;
                    }
                    Value::Datetime(token.parse().ok()?)
                } else {
                    return None;
                }
            }
            _ => return None,
        };
        // A value runs into the next token only when something is wrong.
        if matches!(self.peek(), Some(byte) if byte.is_ascii_alphanumeric() || byte == b'_') {
            return None;
        }
        Some((start..self.pos, value))
    }
}

fn string(value: (Range<usize>, Value)) -> Option<Spanned<String>> {
    match value {
        (span, Value::String(text)) => Some(Spanned::new(span, text)),
        _ => None,
    }
}

fn strings(value: (Range<usize>, Value)) -> Option<Vec<Spanned<String>>> {
    match value {
        (_, Value::Array(items)) => items.into_iter().map(string).collect(),
        _ => None,
    }
}

fn integer(value: (Range<usize>, Value)) -> Option<Spanned<i64>> {
    match value {
        (span, Value::Integer(number)) => Some(Spanned::new(span, number)),
        _ => None,
    }
}

fn boolean(value: (Range<usize>, Value)) -> Option<bool> {
    match value {
        (_, Value::Boolean(flag)) => Some(flag),
        _ => None,
    }
}

fn datetime(value: (Range<usize>, Value)) -> Option<Spanned<toml::value::Datetime>> {
    match value {
        (span, Value::Datetime(datetime)) => Some(Spanned::new(span, datetime)),
        _ => None,
    }
}

fn any(value: (Range<usize>, Value)) -> Option<Spanned<toml::Value>> {
    let (span, value) = value;
    Some(Spanned::new(span, value.into_toml()?))
}

/// Sets a field that must not be set twice (a duplicate key is a `toml` error).
fn once<T>(slot: &mut Option<T>, value: Option<T>) -> Option<()> {
    if slot.is_some() {
        return None;
    }
    *slot = Some(value?);
    Some(())
}

#[derive(Default)]
struct LicenseDraft {
    span: Range<usize>,
    id: Option<Spanned<String>>,
    plan: Option<Spanned<String>>,
    addons: Option<Vec<Spanned<String>>>,
    seats: Option<Spanned<i64>>,
    trial: Option<bool>,
    starts_at: Option<Spanned<toml::value::Datetime>>,
    expires_at: Option<Spanned<toml::value::Datetime>>,
    grace_days: Option<Spanned<i64>>,
    regions: Option<Spanned<toml::Value>>,
    max_devices: Option<Spanned<i64>>,
    overrides: Option<OverridesDraft>,
}

#[derive(Default)]
struct OverridesDraft {
    add_features: Option<Vec<Spanned<String>>>,
    remove_features: Option<Vec<Spanned<String>>>,
    limits: Option<BTreeMap<Spanned<String>, Spanned<toml::Value>>>,
}

impl LicenseDraft {
    fn finish(self) -> Option<Spanned<LicenseFile>> {
        let overrides = self.overrides.map(|overrides| OverridesFile {
            add_features: overrides.add_features.unwrap_or_default(),
            remove_features: overrides.remove_features.unwrap_or_default(),
            limits: overrides.limits.unwrap_or_default(),
        });
        Some(Spanned::new(
            self.span,
            LicenseFile {
                id: self.id,
                plan: self.plan?,
                addons: self.addons.unwrap_or_default(),
                seats: self.seats,
                trial: self.trial.unwrap_or(false),
                starts_at: self.starts_at,
                expires_at: self.expires_at,
                grace_days: self.grace_days,
                regions: self.regions,
                max_devices: self.max_devices,
                overrides: overrides.unwrap_or_default(),
            },
        ))
    }
}

#[derive(Default)]
struct AccountDraft {
    status: Option<Spanned<String>>,
    devices: Option<Vec<Spanned<String>>>,
    groups: Option<BTreeMap<Spanned<String>, Vec<Spanned<String>>>>,
    licenses: Vec<Spanned<LicenseFile>>,
    license: Option<LicenseDraft>,
    users: BTreeMap<Spanned<String>, UserFile>,
}

impl AccountDraft {
    fn close_license(&mut self) -> Option<()> {
        if let Some(license) = self.license.take() {
            self.licenses.push(license.finish()?);
        }
        Some(())
    }

    fn finish(mut self) -> Option<AccountFile> {
        self.close_license()?;
        Some(AccountFile {
            status: self.status,
            devices: self.devices.unwrap_or_default(),
            groups: self.groups.unwrap_or_default(),
            licenses: self.licenses,
            users: self.users,
        })
    }
}

/// Which table the key/value lines below a header fill.
enum Table {
    Account,
    License,
    Overrides,
    User(Spanned<String>),
    Groups,
}

/// The accounts of an account file, or `None` when the file is not of the common shape (or
/// not valid): then the `toml` crate reads it.
pub(crate) fn parse_accounts(text: &str) -> Option<AccountsFile> {
    let mut cursor = Cursor { bytes: text.as_bytes(), text, pos: 0 };
    let mut accounts: BTreeMap<Spanned<String>, Box<AccountFile>> = BTreeMap::new();
    let mut current: Option<(Spanned<String>, AccountDraft)> = None;
    let mut table: Option<Table> = None;
    let mut user: Option<UserFile> = None;
    loop {
        cursor.skip_spaces();
        match cursor.peek() {
            None => break,
            Some(b'\n') => {
                cursor.pos += 1;
            }
            Some(b'#') => cursor.end_of_line()?,
            Some(b'[') => {
                let (mut keys, array, span) = cursor.header()?;
                // Leaving a user's table stores it.
                if let (Some(Table::User(user_id)), Some((_, draft))) = (table.take(), current.as_mut()) {
                    let user_file = user.take()?;
                    if draft.users.insert(user_id, user_file).is_some() {
                        return None;
                    }
                }
                if keys.first().map(|key| key.get_ref().as_str()) != Some("accounts") || keys.len() < 2 {
                    return None;
                }
                let rest: Vec<Spanned<String>> = keys.drain(2..).collect();
                let account_id = keys.pop()?;
                let names: Vec<&str> = rest.iter().map(|key| key.get_ref().as_str()).collect();
                match (names.as_slice(), array) {
                    ([], false) => {
                        if let Some((id, draft)) = current.take()
                            && accounts.insert(id, Box::new(draft.finish()?)).is_some()
                        {
                            return None;
                        }
                        if accounts.contains_key(account_id.get_ref().as_str()) {
                            return None;
                        }
                        current = Some((account_id, AccountDraft::default()));
                        table = Some(Table::Account);
                        continue;
                    }
                    _ => {
                        // Sub-tables only of the account just opened.
                        let (id, draft) = current.as_mut()?;
                        if id.get_ref() != account_id.get_ref() {
                            return None;
                        }
                        match (names.as_slice(), array) {
                            (["licenses"], true) => {
                                draft.close_license()?;
                                draft.license = Some(LicenseDraft { span, ..LicenseDraft::default() });
                                table = Some(Table::License);
                            }
                            (["licenses", "overrides"], false) => {
                                let license = draft.license.as_mut()?;
                                if license.overrides.is_some() {
                                    return None;
                                }
                                license.overrides = Some(OverridesDraft::default());
                                table = Some(Table::Overrides);
                            }
                            (["users", _], false) => {
                                let user_id = rest.into_iter().nth(1)?;
                                if draft.users.contains_key(user_id.get_ref().as_str()) {
                                    return None;
                                }
                                user = Some(UserFile { roles: Vec::new(), groups: Vec::new(), seat: None });
                                table = Some(Table::User(user_id));
                            }
                            (["groups"], false) => {
                                if draft.groups.is_some() {
                                    return None;
                                }
                                draft.groups = Some(BTreeMap::new());
                                table = Some(Table::Groups);
                            }
                            _ => return None,
                        }
                    }
                }
            }
            Some(_) => {
                let key = cursor.bare_key()?;
                cursor.skip_spaces();
                if !cursor.eat(b'=') {
                    return None;
                }
                cursor.skip_spaces();
                let value = cursor.value()?;
                cursor.end_of_line()?;
                let (_, draft) = current.as_mut()?;
                match table.as_ref()? {
                    Table::Account => match key.get_ref().as_str() {
                        "status" => once(&mut draft.status, string(value))?,
                        "devices" => once(&mut draft.devices, strings(value))?,
                        _ => return None,
                    },
                    Table::License => {
                        let license = draft.license.as_mut()?;
                        match key.get_ref().as_str() {
                            "id" => once(&mut license.id, string(value))?,
                            "plan" => once(&mut license.plan, string(value))?,
                            "addons" => once(&mut license.addons, strings(value))?,
                            "seats" => once(&mut license.seats, integer(value))?,
                            "trial" => once(&mut license.trial, boolean(value))?,
                            "starts_at" => once(&mut license.starts_at, datetime(value))?,
                            "expires_at" => once(&mut license.expires_at, datetime(value))?,
                            "grace_days" => once(&mut license.grace_days, integer(value))?,
                            "regions" => once(&mut license.regions, any(value))?,
                            "max_devices" => once(&mut license.max_devices, integer(value))?,
                            _ => return None,
                        }
                    }
                    Table::Overrides => {
                        let overrides = draft.license.as_mut()?.overrides.as_mut()?;
                        match key.get_ref().as_str() {
                            "add_features" => once(&mut overrides.add_features, strings(value))?,
                            "remove_features" => once(&mut overrides.remove_features, strings(value))?,
                            "limits" => {
                                let (_, Value::Table(entries)) = value else { return None };
                                let mut limits = BTreeMap::new();
                                for (meter, limit) in entries {
                                    if limits.insert(meter, any(limit)?).is_some() {
                                        return None;
                                    }
                                }
                                once(&mut overrides.limits, Some(limits))?;
                            }
                            _ => return None,
                        }
                    }
                    Table::User(_) => {
                        let user = user.as_mut()?;
                        match key.get_ref().as_str() {
                            "roles" if user.roles.is_empty() => user.roles = strings(value)?,
                            "groups" if user.groups.is_empty() => user.groups = strings(value)?,
                            "seat" => once(&mut user.seat, boolean(value))?,
                            // A repeated key, or an empty list set twice, is left to `toml`.
                            _ => return None,
                        }
                        // `roles = []` then `roles = [...]` would be a duplicate key.
                        if matches!(key.get_ref().as_str(), "roles") && user.roles.is_empty()
                            || matches!(key.get_ref().as_str(), "groups") && user.groups.is_empty()
                        {
                            return None;
                        }
                    }
                    Table::Groups => {
                        let groups = draft.groups.as_mut()?;
                        if groups.insert(key, strings(value)?).is_some() {
                            return None;
                        }
                    }
                }
            }
        }
    }
    if let (Some(Table::User(user_id)), Some((_, draft))) = (table.take(), current.as_mut())
        && draft.users.insert(user_id, user.take()?).is_some()
    {
        return None;
    }
    if let Some((id, draft)) = current.take()
        && accounts.insert(id, Box::new(draft.finish()?)).is_some()
    {
        return None;
    }
    Some(AccountsFile { accounts })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

    use super::*;
    use crate::generate::{GenOptions, accounts};

    /// The fast reader's result, spans included, is the `toml` crate's.
    fn same_as_toml(text: &str) {
        let fast = parse_accounts(text).unwrap_or_else(|| panic!("the fast reader gave up on:\n{text}"));
        let slow: AccountsFile = toml::from_str(text).unwrap();
        assert_eq!(format!("{fast:#?}"), format!("{slow:#?}"));
    }

    #[test]
    fn generated_files_read_as_the_toml_crate_reads_them() {
        same_as_toml(&accounts(&GenOptions { n_accounts: 400, n_features: 16, seed: 9 }, 0..400));
    }

    #[test]
    fn every_field_of_the_common_shape_reads_as_the_toml_crate_reads_it() {
        same_as_toml(
            "# a comment\n\n[accounts.acme]   # trailing\nstatus = \"suspended\"\ndevices = [ \"d-1\" , \"d-2\", ]\n\n\
             [accounts.acme.groups]\nops = [\"admin\", \"viewer\"]\nnone = []\n\n\
             [[accounts.acme.licenses]]\nid = \"acme-2026\"\nplan = \"team\"\naddons = [\"x\"]\nseats = 12\ntrial = true\n\
             starts_at = 2026-01-01T00:00:00Z\nexpires_at = 2027-01-01\ngrace_days = 0\nregions = { deny = [\"eu\"] }\nmax_devices = 0\n\
             [accounts.acme.licenses.overrides]\nadd_features = [\"a\"]\nremove_features = [\"b\"]\n\
             limits = { api_calls = { soft = 5, hard = -1 }, exports = 3 }\n\
             [[accounts.acme.licenses]]\nplan = \"free\"\nregions = [\"us\"]\n\
             [accounts.acme.users.ann]\nroles = [\"admin\"]\ngroups = [\"ops\"]\nseat = false\n\
             [accounts.acme.users.bob]\n\n[accounts.b]\n",
        );
    }

    #[test]
    fn anything_else_is_left_to_the_toml_crate() {
        for text in [
            "[accounts.a]\nstatus = \"x\"\nstatus = \"y\"\n",
            "[accounts.a]\n[accounts.a]\n",
            "[accounts.a]\nunknown = 1\n",
            "[accounts.a]\n[[accounts.a.licenses]]\nseats = 1\n",
            "[accounts.a]\n[[accounts.a.licenses]]\nplan = \"a\\\"b\"\n",
            "[accounts.a]\n[[accounts.a.licenses]]\nplan = 'literal'\n",
            "[accounts.a]\n[[accounts.a.licenses]]\nplan = \"free\"\nseats = \"5\"\n",
            "[accounts.a]\n[[accounts.a.licenses]]\nplan = \"free\"\nseats = 05\n",
            "[accounts.a]\n[[accounts.a.licenses]]\nplan = \"free\"\nseats = 1_000\n",
            "[accounts.a]\ndevices = [\n\"x\"]\n",
            "[accounts.a]\r\n",
            "[accounts.\"quoted\"]\n",
            "[accounts.a.users.u]\n",
            "[accounts.a]\n[accounts.b.users.u]\n",
            "[other]\n",
            "x = 1\n",
            "[accounts.a]\n[accounts.a.users.u]\n[accounts.a.users.u]\n",
            "[accounts.a]\n[[accounts.a.licenses]]\nplan = \"free\"\nexpires_at = 2026-01-01 10:00:00Z\n",
            "[accounts.a]\n[[accounts.a.licenses]]\nplan = \"free\" x\n",
        ] {
            assert!(parse_accounts(text).is_none(), "{text}");
        }
    }
}
