//! `morgana enroll-token`: a one-line token an agent enrols with.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use morgana_core::wire::EnrollToken;

use crate::catalog::{Catalog, SqliteCatalog};
use crate::config::{DEFAULT_DATA_DIR, DataDir};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long, value_name = "DIR", env = "MORGANA_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// How many devices may enrol with this token.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub uses: u32,
    /// How long the token stays valid: a number followed by s, m, h or d.
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_duration)]
    pub expires: Duration,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let data = DataDir::new(&args.data_dir);
    data.require_initialised()?;
    let ca = crate::tls::load_ca_cert(&data).context("cannot read the appliance CA")?;
    let catalog = SqliteCatalog::open(&data.catalog(), false).await?;
    let (token, expires_at) = create(&catalog, &ca, args.uses, args.expires)
        .await
        .context("cannot store the new enrolment token")?;
    tracing::info!(uses = args.uses, expires = %crate::clock::rfc3339_ms(expires_at), "enrolment token created");
    println!("{token}");
    Ok(())
}

/// Makes and stores a token for `uses` enrolments within `expires`, pinned to the CA whose
/// DER is `ca_der`; returns it with its expiry (unix ms). The web UI and API use this too.
pub async fn create(
    catalog: &dyn Catalog,
    ca_der: &[u8],
    uses: u32,
    expires: Duration,
) -> Result<(EnrollToken, i64), crate::catalog::CatalogError> {
    let token = EnrollToken {
        secret: crate::random::hex(16),
        ca_pin: EnrollToken::pin_of(ca_der),
    };
    let expires_ms = i64::try_from(expires.as_millis()).unwrap_or(i64::MAX);
    let expires_at = crate::clock::now_ms().saturating_add(expires_ms);
    catalog
        .create_token(token.secret_hash(), uses, expires_at)
        .await?;
    Ok((token, expires_at))
}

/// `90s`, `15m`, `24h`, `7d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "`{s}` is not a duration: write a whole number followed by s, m, h or d (e.g. 24h, 7d)"
        )
    };
    let s = s.trim();
    let unit_at = s.len().checked_sub(1).ok_or_else(bad)?;
    if !s.is_char_boundary(unit_at) {
        return Err(bad());
    }
    let (number, unit) = s.split_at(unit_at);
    let n: u64 = number.parse().map_err(|_| bad())?;
    let seconds = match unit {
        "s" => Some(n),
        "m" => n.checked_mul(60),
        "h" => n.checked_mul(3600),
        "d" => n.checked_mul(86_400),
        _ => None,
    }
    .ok_or_else(bad)?;
    if seconds == 0 {
        return Err(format!(
            "`{s}` would expire at once: give a duration above zero"
        ));
    }
    Ok(Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(604_800)));
        for bad in [
            "",
            "h",
            "10",
            "10w",
            "-1h",
            "0s",
            "1.5h",
            "é",
            "99999999999999999999d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
