//! A real browser for tests: Debian's chromium, driven by chromedriver over WebDriver.

use std::{process::Stdio, time::Duration};

use serde_json::json;

use super::wait_for;

/// chromedriver on a free port, ended with the test.
pub struct Driver(std::process::Child, String);

impl Driver {
    pub async fn start() -> Self {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let child = std::process::Command::new(
            std::env::var("BERTH_TEST_CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into()),
        )
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver runs (Debian's chromium-driver)");
        let url = format!("http://127.0.0.1:{port}");
        wait_for("chromedriver", Duration::from_secs(20), async || {
            reqwest::get(format!("{url}/status")).await.is_ok()
        })
        .await;
        Driver(child, url)
    }

    pub async fn browser(&self) -> fantoccini::Client {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({ "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"] }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        fantoccini::ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&self.1)
            .await
            .expect("a browser session")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until the page's text holds `what`, without reloading it.
pub async fn see(browser: &fantoccini::Client, css: &str, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(45);
    loop {
        if let Ok(el) = browser.find(fantoccini::Locator::Css(css)).await
            && el.text().await.is_ok_and(|t| t.contains(what))
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the page never showed {what:?} in {css}: {}",
            browser.source().await.unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Clicks the element `css` names.
pub async fn click(browser: &fantoccini::Client, css: &str) {
    browser
        .find(fantoccini::Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css} on the page: {e}"))
        .click()
        .await
        .unwrap();
}

/// Types `text` into the field `css` names.
pub async fn fill(browser: &fantoccini::Client, css: &str, text: &str) {
    browser
        .find(fantoccini::Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css} on the page: {e}"))
        .send_keys(text)
        .await
        .unwrap();
}
