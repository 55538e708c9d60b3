//! The management web UI in a real browser (headless Chromium through chromedriver)
//! against a real `morgana serve` with a device a real agent enrolled and synced: sign in,
//! find the device, open it, browse its snapshot, check the event log. Screenshots of the
//! main pages go to `target/screenshots/` as artifacts.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use fantoccini::{Client, ClientBuilder, Locator};
use morgana_e2e::*;

const ADMIN_PASSWORD: &str = "browser test password";
/// How long to wait for a page or an htmx swap before giving up (not a timing assertion:
/// a healthy run takes a fraction of it).
const PATIENCE: Duration = Duration::from_secs(60);

/// chromedriver on a free loopback port, killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    fn start() -> Result<Driver> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context(
                "cannot start chromedriver: install Chromium and its driver \
                 (`apt-get install chromium chromium-driver`, as .ci/run does)",
            )?;
        let up = wait_for(PATIENCE, || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        let mut driver = Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        if !up {
            let _ = driver.child.kill();
            bail!("chromedriver did not open port {port}");
        }
        Ok(driver)
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn browser(driver: &Driver, profile: &Path) -> Result<Client> {
    let mut caps = serde_json::Map::new();
    caps.insert("browserName".into(), "chrome".into());
    // The appliance's certificate comes from its own CA.
    caps.insert("acceptInsecureCerts".into(), true.into());
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                "--window-size=1280,900",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .context("cannot open a Chromium session through chromedriver")
}

fn screenshots_dir() -> PathBuf {
    let target = bin_dir().parent().expect("target dir").to_path_buf();
    target.join("screenshots")
}

async fn screenshot(c: &Client, name: &str) -> Result<()> {
    let dir = screenshots_dir();
    fs::create_dir_all(&dir)?;
    let png = c.screenshot().await?;
    fs::write(dir.join(format!("{name}.png")), png)?;
    Ok(())
}

async fn wait_css(c: &Client, css: &str) -> Result<fantoccini::elements::Element> {
    let found = c
        .wait()
        .at_most(PATIENCE)
        .for_element(Locator::Css(css))
        .await;
    match found {
        Ok(e) => Ok(e),
        Err(e) => {
            let url = c.current_url().await.ok();
            Err(e).with_context(|| format!("no element {css} on {url:?}"))
        }
    }
}

async fn wait_xpath(c: &Client, xpath: &str) -> Result<fantoccini::elements::Element> {
    let found = c
        .wait()
        .at_most(PATIENCE)
        .for_element(Locator::XPath(xpath))
        .await;
    match found {
        Ok(e) => Ok(e),
        Err(e) => {
            let url = c.current_url().await.ok();
            Err(e).with_context(|| format!("no element {xpath} on {url:?}"))
        }
    }
}

#[test]
fn sign_in_find_a_device_browse_its_snapshot_and_read_the_log() -> Result<()> {
    crate::init();
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("root");
    fs::create_dir_all(root.join("docs/reports"))?;
    fs::write(root.join("docs/reports/q3.txt"), "quarterly numbers\n")?;
    fs::write(root.join("docs/readme.md"), "# hello\n")?;
    fs::write(root.join("photo.jpg"), vec![7u8; 50_000])?;
    let appliance = Appliance::start_with_env(
        &tmp.path().join("appliance"),
        &[],
        &[("MORGANA_ADMIN_PASSWORD", ADMIN_PASSWORD)],
    )?;
    let agent = Agent::enroll(&appliance, &root, &tmp.path().join("state"))?;
    agent.sync()?;
    let hostname = fs::read_to_string("/proc/sys/kernel/hostname")?
        .trim()
        .to_string();

    let driver = Driver::start()?;
    let profile = tmp.path().join("chromium");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let c = browser(&driver, &profile).await?;
        let result = walk(&c, &appliance.url, &hostname).await;
        if result.is_err() {
            let _ = screenshot(&c, "failure").await;
        }
        let _ = c.close().await;
        result
    })
}

async fn walk(c: &Client, base: &str, hostname: &str) -> Result<()> {
    // Anonymous: sent to the login page; a wrong password says what to do.
    c.goto(&format!("{base}/devices")).await?;
    wait_css(c, "#sign-in").await?;
    screenshot(c, "login").await?;
    wait_css(c, "#name").await?.send_keys("admin").await?;
    wait_css(c, "#password")
        .await?
        .send_keys("wrong password")
        .await?;
    wait_css(c, "#sign-in").await?.click().await?;
    let error = wait_css(c, "#login-error").await?.text().await?;
    assert!(error.contains("Wrong user name or password"), "{error}");

    wait_css(c, "#password")
        .await?
        .send_keys(ADMIN_PASSWORD)
        .await?;
    wait_css(c, "#sign-in").await?.click().await?;
    // Back where we were going: the devices page.
    wait_css(c, "#q").await?;
    assert!(c.current_url().await?.path().starts_with("/devices"));

    // Search with htmx: first something that matches nothing, then the device.
    let q = wait_css(c, "#q").await?;
    q.send_keys("zz-no-such-device").await?;
    wait_xpath(c, "//td[contains(., 'No device matches')]").await?;
    q.clear().await?;
    q.send_keys(&hostname[..hostname.len().min(4)]).await?;
    let link = wait_xpath(
        c,
        &format!("//a[contains(@class, 'device-link') and text()='{hostname}']"),
    )
    .await?;
    screenshot(c, "devices").await?;
    link.click().await?;

    // The device page lists the snapshot the agent made.
    wait_css(c, "#snapshots").await?;
    screenshot(c, "device").await?;
    wait_css(c, "a.browse-link").await?.click().await?;
    wait_css(c, "#tree").await?;
    wait_xpath(
        c,
        "//span[contains(@class, 'entry-name') and text()='photo.jpg']",
    )
    .await?;
    wait_xpath(c, "//a[contains(@class, 'folder') and text()='docs/']")
        .await?
        .click()
        .await?;
    wait_xpath(c, "//a[contains(@class, 'folder') and text()='reports/']")
        .await?
        .click()
        .await?;
    wait_xpath(
        c,
        "//span[contains(@class, 'entry-name') and text()='q3.txt']",
    )
    .await?;
    let crumbs = wait_css(c, "#breadcrumbs").await?.text().await?;
    assert!(
        crumbs.contains("docs") && crumbs.contains("reports"),
        "{crumbs}"
    );
    screenshot(c, "tree").await?;

    // The dashboard counts the device as protected.
    c.goto(&format!("{base}/")).await?;
    let pct = wait_css(c, "#protected-percent").await?.text().await?;
    assert_eq!(pct.trim(), "100 %");
    screenshot(c, "dashboard").await?;

    // The event log: the chain verifies (fetched by htmx), and an event opens.
    c.goto(&format!("{base}/events?kind=device.")).await?;
    let chain = wait_css(c, "#chain-status").await?.text().await?;
    assert!(chain.contains("verifies"), "{chain}");
    screenshot(c, "events").await?;
    wait_xpath(c, "//td/a[contains(@href, '/events/')]")
        .await?
        .click()
        .await?;
    let message = wait_css(c, "#event-message").await?.text().await?;
    assert!(message.contains("enrolled"), "{message}");
    screenshot(c, "event").await?;

    // Administration pages render for the administrator.
    c.goto(&format!("{base}/users")).await?;
    wait_css(c, "#add-user").await?;
    screenshot(c, "users").await?;
    c.goto(&format!("{base}/enroll-tokens")).await?;
    wait_xpath(c, "//button[text()='Create token']")
        .await?
        .click()
        .await?;
    let token = wait_css(c, "#token").await?.text().await?;
    assert!(!token.trim().is_empty());
    screenshot(c, "enroll-tokens").await?;

    // A phone-sized window still shows the devices table.
    c.set_window_size(390, 844).await?;
    c.goto(&format!("{base}/devices")).await?;
    wait_css(c, "a.device-link").await?;
    screenshot(c, "devices-phone").await?;
    Ok(())
}
