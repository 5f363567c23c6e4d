//! The checks every section shares: "must be greater than 0", a setting given inline
//! or as a file to read, and broker URLs.

use std::path::Path;

use super::ConfigError;

/// Each `(key, value)` must be greater than 0; the first that is not is named.
pub(super) fn all_positive(fields: &[(&str, u64)]) -> Result<(), ConfigError> {
    match fields.iter().find(|(_, value)| *value == 0) {
        Some((key, _)) => Err(ConfigError::invalid(*key, "must be greater than 0")),
        None => Ok(()),
    }
}

/// A setting given inline in the config or as a file holding it (secrets, URLs with
/// passwords).
pub(super) enum Given<'a> {
    Inline(&'a str),
    /// The file's whole content; callers trim it as the setting requires.
    File(String),
}

/// The inline value, else the content of `file` (read now, errors named `file_key`),
/// else `None`. Both set is the error `both`: (key, message).
pub(super) fn inline_or_file<'a>(
    inline: Option<&'a str>,
    file: Option<&Path>,
    file_key: &str,
    both: (&str, &str),
) -> Result<Option<Given<'a>>, ConfigError> {
    match (inline, file) {
        (Some(_), Some(_)) => Err(ConfigError::invalid(both.0, both.1)),
        (Some(value), None) => Ok(Some(Given::Inline(value))),
        (None, Some(path)) => read_file(file_key, path).map(|text| Some(Given::File(text))),
        (None, None) => Ok(None),
    }
}

/// A broker URL of `<prefix>.amqp_url` or `<prefix>.amqp_url_file` (a tenant's own, or
/// the dynamic tenants'); `None` when neither is set.
pub(super) fn amqp_url_setting(
    prefix: &str,
    url: Option<&str>,
    file: Option<&Path>,
) -> Result<Option<String>, ConfigError> {
    let file_key = format!("{prefix}.amqp_url_file");
    let given = inline_or_file(
        url,
        file,
        &file_key,
        (&file_key, "set either amqp_url or amqp_url_file, not both"),
    )?;
    match given {
        Some(Given::Inline(url)) => check_url(&format!("{prefix}.amqp_url"), url).map(Some),
        Some(Given::File(text)) => check_url(&file_key, text.trim()).map(Some),
        None => Ok(None),
    }
}

pub(super) fn check_url(key: &str, url: &str) -> Result<String, ConfigError> {
    url.parse::<lapin::uri::AMQPUri>()
        .map_err(|e| ConfigError::invalid(key, format!("not a valid AMQP URL: {e}")))?;
    Ok(url.to_owned())
}

pub(super) fn read_file(key: &str, path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map_err(|e| ConfigError::invalid(key, format!("cannot read {}: {e}", path.display())))
}
