//! The server's logs on stderr: `text` (tracing's human format) or `json`
//! (one JSON object per line), and [`json`], the way to log a list or an
//! absent value as a value rather than Rust debug text.
//!
//! Every field is logged as a plain value: strings, numbers and booleans
//! as themselves, and values wrapped in [`json`] as their JSON text
//! (`origins=["https://app.example.com"]`, `origins=null`), which the
//! `json` format writes as a JSON array, object or `null`, not as a
//! string.

use std::fmt;

use anyhow::Context as _;
use serde::Serialize;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime as _, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::config::LogFormat;

/// Installs the global subscriber: `filter` (e.g. `info`,
/// `switchboard=debug`) in `format`, on stderr.
pub(crate) fn init(format: LogFormat, filter: &str) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_new(filter).with_context(|| format!("invalid log level {filter:?}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        LogFormat::Json => builder.with_ansi(false).event_format(JsonLines).try_init(),
    };
    result.map_err(|err| anyhow::anyhow!("cannot set up logging: {err}"))
}

/// A value logged as its JSON text: a list as a JSON array, `None` as
/// `null`. Use as a field: `origins = logging::json(&origins)`.
pub(crate) fn json<T: Serialize + ?Sized>(value: &T) -> tracing::field::DebugValue<JsonText> {
    let text = serde_json::to_string(value).unwrap_or_else(|err| {
        // Serializing plain data (strings, lists, options) cannot fail;
        // say so in the log rather than panic if it ever does.
        serde_json::Value::String(format!("<not loggable: {err}>")).to_string()
    });
    tracing::field::debug(JsonText(text))
}

/// JSON text whose `Debug` is the text itself.
pub(crate) struct JsonText(String);

impl fmt::Debug for JsonText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One JSON object per event, shaped as tracing-subscriber's own JSON
/// format (`timestamp`, `level`, `fields` with `message`, `target`), but
/// with the fields logged through [`json`] as JSON values.
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut timestamp = String::new();
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        let mut fields = JsonFields::default();
        event.record(&mut fields);
        let metadata = event.metadata();
        let text = |s: &str| serde_json::Value::from(s).to_string();
        writeln!(
            writer,
            "{{\"timestamp\":{},\"level\":{},\"fields\":{{{}}},\"target\":{}}}",
            text(&timestamp),
            text(metadata.level().as_str()),
            fields.0.join(","),
            text(metadata.target()),
        )
    }
}

/// An event's fields as `"name":value` members, in the order logged.
#[derive(Default)]
struct JsonFields(Vec<String>);

impl JsonFields {
    fn push(&mut self, field: &Field, value: serde_json::Value) {
        self.0
            .push(format!("{}:{value}", serde_json::Value::from(field.name())));
    }
}

impl Visit for JsonFields {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.push(field, value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.push(field, value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.push(field, value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.push(field, value.into());
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.push(field, value.into());
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.push(field, value.to_string().into());
    }

    /// `%value` and `?value` fields, [`json`] ones included: JSON text
    /// that is an array, an object or `null` is kept as that value, any
    /// other text is a string.
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let text = format!("{value:?}");
        let json_like =
            field.name() != "message" && (text.starts_with(['[', '{']) || text == "null");
        let value = json_like
            .then(|| serde_json::from_str::<serde_json::Value>(&text).ok())
            .flatten()
            .unwrap_or_else(|| text.into());
        self.push(field, value);
    }
}
