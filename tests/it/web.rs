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

const END_USER_PASSWORD: &str = "end user test password";

/// `morgana user add NAME --role ROLE --password-stdin` beside the running `serve`.
fn add_user(appliance: &Appliance, name: &str, role: &str, password: &str) -> Result<()> {
    use std::io::Write;
    let mut child = morgana()
        .args(["user", "add", name, "--role", role, "--password-stdin"])
        .arg("--data-dir")
        .arg(&appliance.data_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    writeln!(child.stdin.take().context("stdin")?, "{password}")?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("user add failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// A GET with the browser's session cookie (downloads are easier to check byte for byte
/// outside the browser), trusting the appliance's CA.
fn fetch_with_session(appliance: &Appliance, cookie: &str, url: &str) -> Result<Vec<u8>> {
    let out = Command::new("curl")
        .args(["--silent", "--show-error", "--fail", "--cacert"])
        .arg(appliance.data_dir.join("tls/ca.pem"))
        .args(["-H", &format!("Cookie: {cookie}"), url])
        .output()
        .context("cannot run curl")?;
    if !out.status.success() {
        bail!("GET {url}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(out.stdout)
}

#[test]
fn restore_a_folder_from_the_ui_then_download_it_in_the_portal() -> Result<()> {
    crate::init();
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("root");
    fs::create_dir_all(root.join("docs/reports"))?;
    fs::write(root.join("docs/reports/q3.txt"), "quarterly numbers\n")?;
    // Big enough to be stored as several chunks.
    let big: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    fs::write(root.join("docs/big.bin"), &big)?;
    fs::write(root.join("docs/readme.md"), "# hello\n")?;
    let appliance = Appliance::start_with_env(
        &tmp.path().join("appliance"),
        &[],
        &[("MORGANA_ADMIN_PASSWORD", ADMIN_PASSWORD)],
    )?;
    let agent = Agent::enroll(&appliance, &root, &tmp.path().join("state"))?;
    agent.sync()?;
    // The service runs jobs; its schedule would sync again only in an hour.
    let daemon = crate::daemon::Daemon::start(&agent, "1h", &tmp.path().join("agent.log"))?;
    add_user(&appliance, "ann", "end-user", END_USER_PASSWORD)?;
    let hostname = fs::read_to_string("/proc/sys/kernel/hostname")?
        .trim()
        .to_string();
    let restored = tmp.path().join("restored");

    let driver = Driver::start()?;
    let profile = tmp.path().join("chromium");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        let c = browser(&driver, &profile).await?;
        let result = restore_and_download(&c, &appliance, &hostname, &restored, &root).await;
        if result.is_err() {
            let _ = screenshot(&c, "failure-restore-portal").await;
        }
        let _ = c.close().await;
        result
    });
    result.with_context(|| format!("agent log:\n{}", daemon.log()))
}

async fn sign_in(c: &Client, base: &str, name: &str, password: &str) -> Result<()> {
    c.goto(&format!("{base}/login")).await?;
    wait_css(c, "#name").await?.send_keys(name).await?;
    wait_css(c, "#password").await?.send_keys(password).await?;
    wait_css(c, "#sign-in").await?.click().await?;
    Ok(())
}

async fn restore_and_download(
    c: &Client,
    appliance: &Appliance,
    hostname: &str,
    restored: &Path,
    root: &Path,
) -> Result<()> {
    let base = appliance.url.as_str();
    sign_in(c, base, "admin", ADMIN_PASSWORD).await?;
    wait_css(c, "#protected-percent").await?;

    // Read through the page's script, not element handles: htmx replaces fragments (on
    // every poll, or with a form's answer), so a handle found a moment ago may be gone
    // ("stale element").
    let text_of = |id: &'static str| async move {
        let v = c
            .execute(
                "const e = document.getElementById(arguments[0]); return e ? e.textContent : '';",
                vec![serde_json::json!(id)],
            )
            .await?;
        anyhow::Ok(v.as_str().unwrap_or_default().trim().to_owned())
    };

    // Find the device, make ann its owner.
    c.goto(&format!("{base}/devices")).await?;
    wait_css(c, "#q").await?.send_keys(hostname).await?;
    wait_xpath(
        c,
        &format!("//a[contains(@class, 'device-link') and text()='{hostname}']"),
    )
    .await?
    .click()
    .await?;
    wait_css(c, "#snapshots").await?;
    let owner = wait_css(c, "input[name=owner]").await?;
    owner.clear().await?;
    owner.send_keys("ann").await?;
    wait_xpath(c, "//button[text()='Save owner']")
        .await?
        .click()
        .await?;
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let who = text_of("owner").await?;
        if who == "ann" {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the owner still reads {who:?} after saving ann"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    screenshot(c, "device-actions").await?;

    // Browse the snapshot down to docs, restore it to a new place.
    wait_css(c, "a.browse-link").await?.click().await?;
    wait_xpath(c, "//a[contains(@class, 'folder') and text()='docs/']")
        .await?
        .click()
        .await?;
    wait_xpath(
        c,
        "//span[contains(@class, 'entry-name') and text()='big.bin']",
    )
    .await?;
    wait_css(c, "#restore-folder").await?.click().await?;
    let path = wait_css(c, "input[name=path]").await?;
    assert_eq!(path.prop("value").await?.as_deref(), Some("/docs"));
    wait_css(c, "input[name=to]")
        .await?
        .send_keys(&restored.display().to_string())
        .await?;
    screenshot(c, "restore").await?;
    wait_xpath(c, "//button[text()='Review…']")
        .await?
        .click()
        .await?;
    let said = wait_css(c, "#consequences").await?.text().await?;
    assert!(said.contains("is copied from the snapshot into"), "{said}");
    screenshot(c, "restore-confirm").await?;
    wait_css(c, "#confirm-restore").await?.click().await?;

    // The job page follows the job by itself (htmx polling) until it has succeeded.
    wait_css(c, "#job-progress").await?;
    let deadline = std::time::Instant::now() + PATIENCE;
    let state = loop {
        let state = text_of("job-state").await?;
        if state == "succeeded" || state == "failed" || std::time::Instant::now() > deadline {
            break state;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let message = text_of("job-message").await?;
    assert_eq!(state, "succeeded", "{message}");
    screenshot(c, "job").await?;
    // The folder arrives under its own name, byte for byte.
    assert_eq!(
        fs::read(restored.join("docs/big.bin"))?,
        fs::read(root.join("docs/big.bin"))?
    );
    assert_eq!(
        fs::read(restored.join("docs/reports/q3.txt"))?,
        b"quarterly numbers\n"
    );
    c.goto(&format!("{base}/jobs")).await?;
    wait_css(c, "#jobs").await?;
    screenshot(c, "jobs").await?;

    // The owner, in the portal.
    c.delete_all_cookies().await?;
    sign_in(c, base, "ann", END_USER_PASSWORD).await?;
    wait_css(c, "#portal-devices").await?;
    assert_eq!(c.current_url().await?.path(), "/portal");
    screenshot(c, "portal").await?;
    wait_xpath(
        c,
        &format!("//table[@id='portal-devices']//a[text()='{hostname}']"),
    )
    .await?
    .click()
    .await?;
    wait_css(c, "#portal-snapshots").await?;
    screenshot(c, "portal-device").await?;
    wait_css(c, "a.browse-link").await?.click().await?;
    wait_xpath(c, "//a[contains(@class, 'folder') and text()='docs/']")
        .await?
        .click()
        .await?;
    let file_link = wait_xpath(c, "//a[contains(@class, 'file') and text()='big.bin']").await?;
    let zip_link = wait_css(c, "#download-folder").await?;
    screenshot(c, "portal-tree").await?;
    let file_url = file_link.prop("href").await?.context("file link href")?;
    let zip_url = zip_link.prop("href").await?.context("zip link href")?;
    let cookie = c
        .get_all_cookies()
        .await?
        .iter()
        .map(|k| format!("{}={}", k.name(), k.value()))
        .collect::<Vec<_>>()
        .join("; ");

    let file = fetch_with_session(appliance, &cookie, &file_url)?;
    assert!(
        file == fs::read(root.join("docs/big.bin"))?,
        "the downloaded file differs from the source"
    );
    let zip = fetch_with_session(appliance, &cookie, &zip_url)?;
    let unpacked = restored.parent().context("tmp")?.join("unzipped");
    fs::create_dir_all(&unpacked)?;
    let zip_path = unpacked.join("docs.zip");
    fs::write(&zip_path, &zip)?;
    let out = Command::new("python3")
        .args([
            "-c",
            "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); \
             assert z.testzip() is None; z.extractall(sys.argv[2])",
        ])
        .arg(&zip_path)
        .arg(&unpacked)
        .output()?;
    if !out.status.success() {
        bail!(
            "the ZIP does not read back: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for rel in ["big.bin", "readme.md", "reports/q3.txt"] {
        assert_eq!(
            fs::read(unpacked.join("docs").join(rel))?,
            fs::read(root.join("docs").join(rel))?,
            "{rel} in the ZIP"
        );
    }

    // Search by name.
    c.goto(&format!("{base}/portal/search?q=q3")).await?;
    wait_xpath(
        c,
        "//table[@id='search-results']//a[contains(., '/docs/reports/q3.txt')]",
    )
    .await?;
    screenshot(c, "portal-search").await?;

    // A phone-sized window.
    c.set_window_size(390, 844).await?;
    c.goto(&format!("{base}/portal")).await?;
    wait_css(c, "#portal-devices").await?;
    screenshot(c, "portal-phone").await?;
    Ok(())
}

const IMAGE_MANAGER_PASSWORD: &str = "image manager test password";

fn write(root: &Path, path: &str, data: &[u8]) -> Result<()> {
    let p = root.join(path);
    fs::create_dir_all(p.parent().context("parent")?)?;
    fs::write(&p, data).with_context(|| format!("write {}", p.display()))
}

#[test]
fn an_image_manager_captures_a_base_layer_and_deploys_it_from_the_ui() -> Result<()> {
    crate::init();
    let tmp = tempfile::tempdir()?;
    let appliance = Appliance::start_with(&tmp.path().join("appliance"), &["--gc-every", "off"])?;
    add_user(
        &appliance,
        "imogen",
        "image-manager",
        IMAGE_MANAGER_PASSWORD,
    )?;

    // The reference machine: system files, its identity, a user's home.
    let refroot = tmp.path().join("ref");
    write(&refroot, "etc/hostname", b"ref\n")?;
    write(&refroot, "etc/machine-id", b"ref-machine-id\n")?;
    write(&refroot, "etc/app.conf", b"level = 1\n")?;
    write(&refroot, "usr/bin/tool", &noise(200_000, 1))?;
    write(&refroot, "usr/share/doc/tool/README", b"the tool")?;
    write(&refroot, "home/admin/notes.txt", b"reference notes")?;
    let reference = Agent::enroll(&appliance, &refroot, &tmp.path().join("ref-state"))?;
    reference.sync()?;
    let ref_id = crate::daemon::device_id(&reference)?;

    // The target: its own identity and user data, an old tool; its service runs the job.
    let root = tmp.path().join("target");
    write(&root, "etc/hostname", b"target\n")?;
    write(&root, "etc/machine-id", b"target-machine-id\n")?;
    write(&root, "home/user/doc.txt", b"the user's work")?;
    write(&root, "usr/bin/tool", b"an old tool")?;
    let target = Agent::enroll(&appliance, &root, &tmp.path().join("target-state"))?;
    target.sync()?;
    let target_id = crate::daemon::device_id(&target)?;
    let daemon = crate::daemon::Daemon::start(&target, "1h", &tmp.path().join("target.log"))?;

    let driver = Driver::start()?;
    let profile = tmp.path().join("chromium");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        let c = browser(&driver, &profile).await?;
        let result = capture_and_deploy(&c, &appliance.url, &ref_id, &target_id).await;
        if result.is_err() {
            let _ = screenshot(&c, "failure-images").await;
        }
        let _ = c.close().await;
        result
    });
    result.with_context(|| format!("target agent log:\n{}", daemon.log()))?;

    // On disk: the reference's system, the target's own identity and user data.
    for path in ["usr/bin/tool", "usr/share/doc/tool/README", "etc/app.conf"] {
        assert_eq!(
            hash_file(&root.join(path))?,
            hash_file(&refroot.join(path))?,
            "{path}"
        );
    }
    assert_eq!(fs::read(root.join("etc/hostname"))?, b"target\n");
    assert_eq!(
        fs::read(root.join("etc/machine-id"))?,
        b"target-machine-id\n"
    );
    assert_eq!(
        fs::read(root.join("home/user/doc.txt"))?,
        b"the user's work"
    );
    assert!(
        !root.join("home/admin").exists(),
        "the reference's home stays there"
    );
    Ok(())
}

async fn capture_and_deploy(c: &Client, base: &str, ref_id: &str, target_id: &str) -> Result<()> {
    sign_in(c, base, "imogen", IMAGE_MANAGER_PASSWORD).await?;
    // The navigation offers the Images page to an image manager.
    wait_xpath(c, "//nav//a[text()='Images']")
        .await?
        .click()
        .await?;
    wait_css(c, "#no-layers").await?;

    // Mark the reference machine.
    let select = wait_css(c, "#mark-reference select").await?;
    select.select_by_value(ref_id).await?;
    wait_css(c, "#mark-reference button").await?.click().await?;
    let notice = wait_css(c, "#notice").await?.text().await?;
    assert!(notice.contains("Marked as a reference machine"), "{notice}");
    screenshot(c, "images").await?;

    // Capture a base layer from its snapshot: the form, the confirmation, the new version.
    wait_xpath(
        c,
        &format!("//a[contains(@class, 'capture-link') and contains(@href, '{ref_id}')]"),
    )
    .await?
    .click()
    .await?;
    wait_css(c, "#layer-name")
        .await?
        .send_keys("office-base")
        .await?;
    wait_css(c, "input[name=notes]")
        .await?
        .send_keys("from the browser")
        .await?;
    screenshot(c, "capture").await?;
    wait_css(c, "#capture-next").await?.click().await?;
    let summary = wait_css(c, "#capture-summary").await?.text().await?;
    assert!(summary.contains("system of"), "{summary}");
    wait_css(c, "#confirm-capture").await?.click().await?;
    let result = wait_css(c, "#capture-result").await?.text().await?;
    assert!(result.contains("base layer office-base v1"), "{result}");
    screenshot(c, "captured").await?;

    // Assign it to the target: the dry run first, then confirm.
    wait_css(c, "#assign-next").await?.click().await?;
    wait_css(c, &format!("input[name=devices][value='{target_id}']"))
        .await?
        .click()
        .await?;
    let chosen = wait_css(c, "#base").await?.prop("value").await?;
    assert_eq!(chosen.as_deref(), Some("office-base:1"));
    wait_css(c, "#dry-run").await?.click().await?;
    let table = wait_css(c, "#dry-run-table").await?.text().await?;
    assert!(table.contains(target_id), "{table}");
    // The target's old tool is replaced, and it has its own copy: a conflict the page names.
    let conflicts = wait_css(c, "ul.conflicts").await?.text().await?;
    assert!(
        conflicts.contains("user-changed") && conflicts.contains("/usr/bin/tool"),
        "{conflicts}"
    );
    screenshot(c, "assign-dry-run").await?;
    wait_css(c, "#confirm-assign").await?.click().await?;

    // The deployment page follows the apply job until it has ended.
    wait_css(c, "#deployment-table").await?;
    screenshot(c, "deployment-running").await?;
    let done = wait_css(c, "#deployment-done").await?.text().await?;
    assert!(done.contains("1 succeeded, 0 failed"), "{done}");
    let state = wait_css(c, ".job-state").await?.text().await?;
    assert_eq!(state.trim(), "succeeded");
    let files = wait_xpath(c, "//table[@id='deployment-table']//td[3]")
        .await?
        .text()
        .await?;
    let (done_files, total) = files
        .split_once(" of ")
        .with_context(|| format!("files cell {files:?}"))?;
    assert_eq!(done_files.trim(), total.trim(), "{files}");
    assert_ne!(total.trim(), "0", "{files}");
    screenshot(c, "deployment-done").await?;

    // Phone-sized, the Images page still reads.
    c.set_window_size(390, 844).await?;
    c.goto(&format!("{base}/images")).await?;
    wait_css(c, "#deployments").await?;
    screenshot(c, "images-phone").await?;
    Ok(())
}
