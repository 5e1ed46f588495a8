//! A singleton command's configuration (`[singleton.<name>]` of the runner's config) and
//! its cron schedule: which slots are due, which a new holder starts after. Below the
//! configuration, which reads these tables, and the singleton protocol
//! ([`crate::singleton`]), which runs them.

use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Local, TimeZone, Utc};
use qslice_common::config::humantime_serde_opt;
use qslice_common::lease::unix_ms;
use qslice_proto::keys::validate_name;
use serde::Deserialize;

/// The time zone a schedule is read in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Zone {
    /// The host's local time zone, as cron reads a crontab.
    #[default]
    Local,
    /// UTC.
    Utc,
}

/// One `[singleton.<name>]` table of the runner's configuration.
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct SingletonConfig {
    /// The command's argv (never a shell).
    #[serde(default)]
    pub command: Vec<String>,
    /// A cron expression (5 fields, or 6 with seconds first); periodic singletons only.
    #[serde(default)]
    pub schedule: Option<String>,
    /// The command runs all the time instead of on a schedule.
    #[serde(default)]
    pub long_running: bool,
    /// The time zone the schedule is read in [default: local].
    #[serde(default)]
    pub timezone: Zone,
    /// How many missed slots (the most recent ones) a holder runs at once after a
    /// takeover or a time without holder [default: 1].
    #[serde(default = "default_catch_up")]
    pub catch_up: usize,
    /// Longest run of a periodic command before it is killed [default: none].
    #[serde(default, deserialize_with = "humantime_serde_opt::deserialize", serialize_with = "serialize_opt_duration")]
    pub timeout: Option<Duration>,
    /// How long the command may take to exit after SIGTERM (shutdown) before SIGKILL [default: 30s].
    #[serde(default, deserialize_with = "humantime_serde_opt::deserialize", serialize_with = "serialize_opt_duration")]
    pub stop_timeout: Option<Duration>,
    /// User to run as (name or uid); needs the runner to run as root.
    #[serde(default)]
    pub user: Option<String>,
    /// Working directory.
    #[serde(default)]
    pub workdir: Option<PathBuf>,
    /// Environment variables passed through from the runner's environment.
    #[serde(default)]
    pub env: Vec<String>,
}

fn serialize_opt_duration<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.collect_str(&humantime::format_duration(*d)),
        None => s.serialize_none(),
    }
}

fn default_catch_up() -> usize {
    1
}

/// The default of `stop_timeout`.
const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(30);

impl SingletonConfig {
    /// How long the command may take to exit after SIGTERM.
    pub fn stop_timeout(&self) -> Duration {
        self.stop_timeout.unwrap_or(DEFAULT_STOP_TIMEOUT)
    }

    /// Checks the table of singleton `name`; the error names the key.
    pub fn check(&self, name: &str) -> Result<(), String> {
        validate_name("singleton", name).map_err(|e| format!("singleton.{name}: {e}"))?;
        if self.command.is_empty() {
            return Err(format!("singleton.{name}.command: required, the command's argv as an array, e.g. [\"/opt/mailman/bin/mailman\", \"notify\"]"));
        }
        match (&self.schedule, self.long_running) {
            (Some(_), true) => return Err(format!("singleton.{name}.schedule: a long_running singleton has no schedule; give one or the other")),
            (None, false) => return Err(format!("singleton.{name}.schedule: required unless long_running = true (a cron expression, e.g. \"0 0 * * *\")")),
            (Some(expr), false) => {
                Schedule::parse(expr, self.timezone).map_err(|e| format!("singleton.{name}.schedule: {e}"))?;
            }
            (None, true) => {}
        }
        if self.long_running && self.timeout.is_some() {
            return Err(format!("singleton.{name}.timeout: only periodic singletons have a run timeout"));
        }
        if self.timeout.is_some_and(|t| t.is_zero()) {
            return Err(format!("singleton.{name}.timeout: must be above zero"));
        }
        if self.catch_up == 0 {
            return Err(format!("singleton.{name}.catch_up: must be at least 1 (the most recent due slot always runs)"));
        }
        if let Some(user) = &self.user {
            crate::supervise::resolve_user(user).ok_or_else(|| format!("singleton.{name}.user: unknown user {user:?}"))?;
        }
        Ok(())
    }
}

/// A periodic singleton's schedule: a cron expression read in a time zone. Slots are
/// absolute times in milliseconds since the Unix epoch (whole seconds).
#[derive(Clone, Debug)]
pub struct Schedule {
    cron: croner::Cron,
    zone: Zone,
}

impl Schedule {
    /// Parses a cron expression: 5 fields (minute first) or 6 (seconds first).
    pub fn parse(expr: &str, zone: Zone) -> Result<Schedule, String> {
        let parser = croner::parser::CronParser::builder().seconds(croner::parser::Seconds::Optional).build();
        let cron = parser.parse(expr).map_err(|e| format!("invalid cron expression {expr:?}: {e}"))?;
        // An expression that never matches (the 30th of February) would leave the holder
        // waiting forever: refuse it.
        let schedule = Schedule { cron, zone };
        if schedule.next_after(unix_ms()).is_none() {
            return Err(format!("cron expression {expr:?} never matches"));
        }
        Ok(schedule)
    }

    fn at<Tz: TimeZone>(ms: i64, tz: &Tz) -> Option<DateTime<Tz>> {
        tz.timestamp_millis_opt(ms).single()
    }

    /// The first slot strictly after `after_ms`.
    pub fn next_after(&self, after_ms: i64) -> Option<i64> {
        match self.zone {
            Zone::Utc => self.cron.find_next_occurrence(&Self::at(after_ms, &Utc)?, false).ok().map(|t| t.timestamp_millis()),
            Zone::Local => self.cron.find_next_occurrence(&Self::at(after_ms, &Local)?, false).ok().map(|t| t.timestamp_millis()),
        }
    }

    /// The last slot at or before `at_ms`.
    pub fn last_at_or_before(&self, at_ms: i64) -> Option<i64> {
        match self.zone {
            Zone::Utc => self.cron.find_previous_occurrence(&Self::at(at_ms, &Utc)?, true).ok().map(|t| t.timestamp_millis()),
            Zone::Local => self.cron.find_previous_occurrence(&Self::at(at_ms, &Local)?, true).ok().map(|t| t.timestamp_millis()),
        }
    }

    /// The last slot strictly before `before_ms`.
    fn last_before(&self, before_ms: i64) -> Option<i64> {
        self.last_at_or_before(before_ms - 1)
    }
}

/// What a periodic singleton's holder does next, given the last settled slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Due {
    /// Due slots not settled yet that are to run now, oldest first (at most `catch_up`).
    pub run: Vec<i64>,
    /// Whether older unsettled slots exist beyond those: they are skipped.
    pub skipped_older: bool,
    /// The next slot after now, to wait for when nothing is due.
    pub next: Option<i64>,
}

/// The slots due at `now_ms` after the last settled slot `settled_ms`: the most recent
/// `catch_up` slots in (settled, now], oldest first, and the next slot after now.
pub fn due(schedule: &Schedule, settled_ms: i64, now_ms: i64, catch_up: usize) -> Due {
    let mut run = Vec::new();
    let mut cursor = schedule.last_at_or_before(now_ms);
    while let Some(slot) = cursor {
        if slot <= settled_ms {
            break;
        }
        if run.len() == catch_up {
            break;
        }
        run.push(slot);
        cursor = schedule.last_before(slot);
    }
    let skipped_older = run.len() == catch_up && cursor.is_some_and(|s| s > settled_ms);
    run.reverse();
    Due { run, skipped_older, next: schedule.next_after(now_ms) }
}

/// Where a singleton starts when no slot was ever settled: the last slot at or before
/// `now_ms` counts as settled (a schedule starts now, it does not run the past).
pub fn baseline(schedule: &Schedule, now_ms: i64) -> i64 {
    schedule.last_at_or_before(now_ms).unwrap_or(now_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(expr: &str) -> Schedule {
        Schedule::parse(expr, Zone::Utc).expect("valid")
    }

    /// 2026-12-01T10:00:00Z in ms.
    const T0: i64 = 1_796_119_200_000;

    #[test]
    fn five_and_six_field_expressions_give_absolute_slots() {
        let hourly = utc("0 * * * *");
        assert_eq!(hourly.next_after(T0), Some(T0 + 3_600_000));
        assert_eq!(hourly.last_at_or_before(T0), Some(T0));
        assert_eq!(hourly.last_at_or_before(T0 + 1), Some(T0));
        let every_second = utc("* * * * * *");
        assert_eq!(every_second.next_after(T0 + 400), Some(T0 + 1000));
        let every_ten = utc("*/10 * * * * *");
        assert_eq!(every_ten.next_after(T0), Some(T0 + 10_000));
    }

    #[test]
    fn nothing_is_due_until_the_next_slot_and_then_exactly_that_slot() {
        let s = utc("*/10 * * * * *");
        let d = due(&s, T0, T0 + 5_000, 1);
        assert_eq!(d, Due { run: vec![], skipped_older: false, next: Some(T0 + 10_000) });
        let d = due(&s, T0, T0 + 10_000, 1);
        assert_eq!(d.run, vec![T0 + 10_000]);
        assert!(!d.skipped_older);
        // Once settled, the same slot is never due again.
        assert!(due(&s, T0 + 10_000, T0 + 10_500, 1).run.is_empty());
    }

    #[test]
    fn a_takeover_runs_the_unsettled_slots_up_to_the_catch_up_newest_first_kept() {
        let s = utc("*/10 * * * * *");
        // The previous holder settled T0 and died; the new holder looks 35 s later.
        let d = due(&s, T0, T0 + 35_000, 10);
        assert_eq!(d.run, vec![T0 + 10_000, T0 + 20_000, T0 + 30_000]);
        assert!(!d.skipped_older);
        let d = due(&s, T0, T0 + 35_000, 1);
        assert_eq!(d.run, vec![T0 + 30_000], "only the most recent one");
        assert!(d.skipped_older);
        let d = due(&s, T0, T0 + 35_000, 2);
        assert_eq!(d.run, vec![T0 + 20_000, T0 + 30_000]);
        assert!(d.skipped_older);
    }

    #[test]
    fn a_new_schedule_starts_now_and_does_not_run_the_past() {
        let s = utc("0 * * * *");
        let start = baseline(&s, T0 + 1_800_000);
        assert_eq!(start, T0);
        assert!(due(&s, start, T0 + 1_800_000, 5).run.is_empty());
        assert_eq!(due(&s, start, T0 + 3_600_000, 5).run, vec![T0 + 3_600_000]);
    }

    #[test]
    fn the_runner_configuration_refuses_a_bad_singleton_table_naming_the_key() {
        use clap::Parser;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("runner.toml");
        let resolve = |table: &str| {
            std::fs::write(&path, format!("spool = \"/spool\"\n[handler]\nkind = \"move\"\nmove_to = \"/out\"\n{table}")).expect("write");
            let args = crate::config::Args::try_parse_from(["qslice-runner", "--config", path.to_str().expect("utf8")]).expect("flags");
            crate::config::Config::resolve(&args)
        };
        let cfg = resolve("[singleton.digests]\ncommand = [\"/bin/true\"]\nschedule = \"0 0 * * *\"\n").expect("valid");
        assert_eq!(cfg.singleton["digests"].schedule.as_deref(), Some("0 0 * * *"));
        let err = resolve("[singleton.digests]\ncommand = [\"/bin/true\"]\nschedule = \"0 0 * *\"\n").expect_err("four fields");
        assert!(err.to_string().contains("singleton.digests.schedule"), "{err}");
        let err = resolve("[singleton.digests]\ncommand = [\"/bin/true\"]\nschedul = \"0 0 * * *\"\n").expect_err("typo");
        assert!(err.to_string().contains("schedul"), "{err}");
    }

    fn table(text: &str) -> Result<SingletonConfig, String> {
        let cfg: SingletonConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        cfg.check("digests").map(|()| cfg)
    }

    #[test]
    fn a_table_needs_a_command_and_exactly_one_of_schedule_and_long_running() {
        assert!(table("command = [\"/bin/true\"]\nschedule = \"0 0 * * *\"\n").is_ok());
        assert!(table("command = [\"/bin/true\"]\nlong_running = true\n").is_ok());
        let err = table("schedule = \"0 0 * * *\"\n").expect_err("no command");
        assert!(err.contains("singleton.digests.command"), "{err}");
        let err = table("command = [\"/bin/true\"]\n").expect_err("neither");
        assert!(err.contains("singleton.digests.schedule") && err.contains("long_running"), "{err}");
        let err = table("command = [\"/bin/true\"]\nschedule = \"0 0 * * *\"\nlong_running = true\n").expect_err("both");
        assert!(err.contains("singleton.digests.schedule"), "{err}");
    }

    #[test]
    fn bad_values_are_errors_that_name_the_key() {
        let err = table("command = [\"/bin/true\"]\nschedule = \"61 * * * *\"\n").expect_err("bad cron");
        assert!(err.contains("singleton.digests.schedule") && err.contains("61 * * * *"), "{err}");
        let err = table("command = [\"/bin/true\"]\nschedule = \"0 0 30 2 *\"\n").expect_err("never");
        assert!(err.contains("singleton.digests.schedule"), "{err}");
        let err = table("command = [\"/bin/true\"]\nschedule = \"* * * * *\"\ncatch_up = 0\n").expect_err("catch_up");
        assert!(err.contains("singleton.digests.catch_up"), "{err}");
        let err = table("command = [\"/bin/true\"]\nlong_running = true\ntimeout = \"1m\"\n").expect_err("timeout");
        assert!(err.contains("singleton.digests.timeout"), "{err}");
        let err = table("command = [\"/bin/true\"]\nlong_running = true\nuser = \"no-such-user-qslice\"\n").expect_err("user");
        assert!(err.contains("singleton.digests.user"), "{err}");
        let err = table("command = [\"/bin/true\"]\nlong_runing = true\n").expect_err("typo");
        assert!(err.contains("long_runing"), "{err}");
        let err = SingletonConfig {
            command: vec!["/bin/true".into()],
            schedule: None,
            long_running: true,
            timezone: Zone::Utc,
            catch_up: 1,
            timeout: None,
            stop_timeout: None,
            user: None,
            workdir: None,
            env: vec![],
        }
        .check("a/b")
        .expect_err("name");
        assert!(err.contains("singleton.a/b"), "{err}");
    }
}
