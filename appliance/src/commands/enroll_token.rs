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

pub use morgana_core::duration::parse_duration;

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
