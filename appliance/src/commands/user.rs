//! `morgana user`: manage web UI and API accounts from the shell (the first administrator,
//! scripted setups, and a way back in when every administrator is locked out).

use std::io::Read;
use std::path::PathBuf;

use anyhow::Context;

use crate::catalog::{Catalog, SqliteCatalog};
use crate::config::{DEFAULT_DATA_DIR, DataDir};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Add a user; prints a generated one-time password unless --password-stdin is given.
    Add(AddArgs),
    /// List the users and their roles.
    List(ListArgs),
}

#[derive(Debug, clap::Args)]
pub struct AddArgs {
    /// Letters, digits, `.`, `-`, `_` or `@`.
    pub name: String,
    /// administrator, image-manager, protection-manager, helpdesk or end-user.
    #[arg(long, value_name = "ROLE")]
    pub role: String,
    /// Read the password from standard input (one line) instead of generating one.
    #[arg(long)]
    pub password_stdin: bool,
    #[arg(long, value_name = "DIR", env = "MORGANA_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[arg(long, value_name = "DIR", env = "MORGANA_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
}

pub async fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Add(args) => add(args).await,
        Command::List(args) => list(args).await,
    }
}

async fn open(data_dir: &std::path::Path) -> anyhow::Result<SqliteCatalog> {
    let data = DataDir::new(data_dir);
    data.require_initialised()?;
    Ok(SqliteCatalog::open(&data.catalog(), false).await?)
}

async fn add(args: AddArgs) -> anyhow::Result<()> {
    let password = if args.password_stdin {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("cannot read the password from standard input")?;
        let line = s.lines().next().unwrap_or("").to_owned();
        anyhow::ensure!(
            !line.is_empty(),
            "standard input held no password: pipe one line, e.g. `echo 'PASSWORD' | morgana user add ...`"
        );
        Some(line)
    } else {
        None
    };
    let catalog = open(&args.data_dir).await?;
    let result =
        crate::web::ops::create_user(&catalog, "cli", &args.name, &args.role, password.as_deref())
            .await;
    catalog.close().await;
    let (user, generated) = result.map_err(|e| anyhow::anyhow!("cannot add the user: {e}"))?;
    match generated {
        Some(p) => println!(
            "user {} added as {}; one-time password (they choose their own at first sign-in): {p}",
            user.name,
            user.role.name()
        ),
        None => println!("user {} added as {}", user.name, user.role.name()),
    }
    Ok(())
}

async fn list(args: ListArgs) -> anyhow::Result<()> {
    let catalog = open(&args.data_dir).await?;
    let users = catalog.users().await.context("cannot list users");
    catalog.close().await;
    for u in users? {
        println!(
            "{}\t{}\t{}",
            u.name,
            u.role.name(),
            if u.disabled { "disabled" } else { "active" }
        );
    }
    Ok(())
}
