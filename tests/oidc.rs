//! Sign-in with OpenID Connect against a real provider running on this machine
//! (django-oauth-toolkit, `ops/oidc/provider.py`): through its own login page in
//! Chromium, and at the HTTP level for what a browser would not do on its own
//! (forged, replayed and cross-browser callbacks, a code of another sign-in).

mod common;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use common::{
    ADMIN_USER, TestEnv,
    browser::{Driver, click, fill, see},
};
use reqwest::{Method, StatusCode, Url, header};
use serde_json::{Value, json};

/// The provider, on a port picked before Berth starts (Berth learns about it
/// only when a sign-in begins), stopped by its PID with the test.
struct Idp {
    port: u16,
    child: Option<Child>,
    dir: PathBuf,
}

impl Idp {
    fn pick() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("berth-idp-{:08x}", rand::random::<u32>()));
        Idp {
            port,
            child: None,
            dir,
        }
    }

    fn issuer(&self) -> String {
        format!("http://127.0.0.1:{}/o", self.port)
    }

    /// A Berth provider setting for one of this provider's clients.
    fn provider(&self, name: &str, client: &str, extra: Value) -> Value {
        let mut p = json!({
            "name": name,
            "display_name": format!("Test IdP ({name})"),
            "issuer": self.issuer(),
            "client_id": client,
            "client_secret": format!("{client}-secret-0123456789"),
        });
        p.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        p
    }

    /// Starts it with these users; its clients may send browsers back to `base`.
    async fn start(&mut self, base: &str, clients: &[&str], users: Value) {
        std::fs::create_dir_all(&self.dir).unwrap();
        let clients: Vec<Value> = clients
            .iter()
            .map(|c| {
                let redirect_uris: Vec<String> = ["corp", "open", "closed"]
                    .iter()
                    .map(|p| format!("{base}/api/v1/auth/oidc/{p}/callback"))
                    .collect();
                json!({
                    "client_id": c,
                    "client_secret": format!("{c}-secret-0123456789"),
                    "redirect_uris": redirect_uris,
                })
            })
            .collect();
        let setup = self.dir.join("setup.json");
        std::fs::write(
            &setup,
            json!({ "users": users, "clients": clients }).to_string(),
        )
        .unwrap();
        let python = std::env::var("BERTH_TEST_OIDC_PYTHON")
            .unwrap_or_else(|_| "/tmp/berth-test-venv/bin/python".into());
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/ops/oidc/provider.py");
        let child = Command::new(&python)
            .arg(script)
            .args(["--port", &self.port.to_string(), "--data"])
            .arg(&self.dir)
            .arg("--setup")
            .arg(&setup)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("idp.log")).unwrap())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("the test provider runs ({python}, with django-oauth-toolkit): {e}")
            });
        self.child = Some(child);
        let discovery = format!("{}/.well-known/openid-configuration", self.issuer());
        let dir = self.dir.clone();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if reqwest::get(&discovery)
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the provider did not start: {}",
                std::fs::read_to_string(dir.join("idp.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A browser at the HTTP level: its own cookies, redirects seen one by one.
struct Jar {
    http: reqwest::Client,
    cookies: BTreeMap<String, String>,
}

impl Jar {
    fn new() -> Self {
        Jar {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            cookies: BTreeMap::new(),
        }
    }

    fn cookie(&self, name: &str) -> Option<&str> {
        self.cookies.get(name).map(String::as_str)
    }

    async fn send(&mut self, request: reqwest::RequestBuilder) -> reqwest::Response {
        let mut request = request.header(header::ACCEPT, "text/html");
        if !self.cookies.is_empty() {
            let line: Vec<String> = self
                .cookies
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            request = request.header(header::COOKIE, line.join("; "));
        }
        let response = request.send().await.expect("an answer");
        for set in response.headers().get_all(header::SET_COOKIE) {
            let set = set.to_str().unwrap();
            let (pair, attributes) = set.split_once(';').unwrap_or((set, ""));
            let (name, value) = pair.split_once('=').unwrap();
            if value.is_empty() || attributes.contains("Max-Age=0") {
                self.cookies.remove(name);
            } else {
                self.cookies.insert(name.to_owned(), value.to_owned());
            }
        }
        response
    }

    async fn get(&mut self, url: &str) -> reqwest::Response {
        let request = self.http.get(url);
        self.send(request).await
    }
}

fn location(response: &reqwest::Response) -> String {
    let base = response.url().clone();
    let to = response.headers()[header::LOCATION].to_str().unwrap();
    base.join(to).unwrap().to_string()
}

/// Begins a sign-in at Berth: the provider's authorization URL.
async fn begin(jar: &mut Jar, env: &TestEnv, start: &str) -> String {
    let response = jar.get(&format!("{}{start}", env.base)).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER, "{start}");
    let to = location(&response);
    assert!(jar.cookie("berth_oidc").is_some(), "the browser is bound");
    to
}

/// Goes through the provider (its login page when this browser has no session
/// there) to the callback URL it sends the browser back to, not followed.
async fn at_provider(jar: &mut Jar, env: &TestEnv, mut url: String, user: &str) -> String {
    for _ in 0..8 {
        if url.starts_with(&env.base) {
            return url;
        }
        let response = jar.get(&url).await;
        if response.status().is_redirection() {
            url = location(&response);
            continue;
        }
        let status = response.status();
        let page = response.text().await.unwrap();
        assert_eq!(status, StatusCode::OK, "the provider answered: {page}");
        let csrf = page
            .split("name=\"csrfmiddlewaretoken\" value=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap_or_else(|| panic!("not the provider's login page: {page}"));
        let form = [
            ("csrfmiddlewaretoken", csrf),
            ("username", user),
            ("password", "provider password 1"),
        ];
        let request = jar.http.post(&url).form(&form);
        let response = jar.send(request).await;
        assert_eq!(response.status(), StatusCode::FOUND, "the provider's login");
        url = location(&response);
    }
    panic!("the provider never sent the browser back to Berth");
}

/// A whole sign-in up to the callback URL.
async fn callback_url(jar: &mut Jar, env: &TestEnv, start: &str, user: &str) -> String {
    let authorize = begin(jar, env, start).await;
    at_provider(jar, env, authorize, user).await
}

fn with_query(url: &str, key: &str, value: &str) -> String {
    let mut url = Url::parse(url).unwrap();
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| k != key)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    url.query_pairs_mut()
        .clear()
        .extend_pairs(pairs)
        .append_pair(key, value);
    url.to_string()
}

fn query_of(url: &str, key: &str) -> String {
    Url::parse(url)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| panic!("{url} has no {key}"))
}

/// A query value, percent-encoded.
fn encode(value: &str) -> String {
    let mut url = Url::parse("http://x/").unwrap();
    url.query_pairs_mut().append_pair("v", value);
    url.query().unwrap().trim_start_matches("v=").to_owned()
}

fn user(name: &str, email: &str, groups: &[&str]) -> Value {
    json!({ "username": name, "password": "provider password 1", "email": email, "groups": groups })
}

async fn text_of(response: reqwest::Response) -> (StatusCode, String) {
    let status = response.status();
    (status, response.text().await.unwrap())
}

async fn audit_actions(env: &TestEnv) -> Vec<Value> {
    let (status, body) = env
        .call(Method::GET, "/api/v1/admin/audit?per_page=200", None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["entries"].as_array().cloned().unwrap_or_default()
}

#[tokio::test]
async fn a_browser_signs_in_through_the_provider_s_own_page_and_lands_in_the_dashboard() {
    let mut idp = Idp::pick();
    let corp = idp.provider(
        "corp",
        "berth",
        json!({ "allow_signup": true, "allowed_domains": ["example.org"],
                "groups_claim": "groups", "admin_groups": ["berth-admins"] }),
    );
    let providers = json!([corp]).to_string();
    let env = TestEnv::start_with(&["--oidc-providers", &providers]).await;
    idp.start(
        &env.base,
        &["berth"],
        json!([user("ada", "ada@example.org", &["berth-admins", "physics"])]),
    )
    .await;

    let driver = Driver::start().await;
    let browser = driver.browser().await;
    browser
        .goto(&format!("{}/admin/servers", env.base))
        .await
        .unwrap();
    see(
        &browser,
        "a[data-provider='corp']",
        "Sign in with Test IdP (corp)",
    )
    .await;
    click(&browser, "a[data-provider='corp']").await;
    // The provider's own login page.
    see(&browser, "h1", "Test identity provider").await;
    fill(&browser, "#id_username", "ada").await;
    fill(&browser, "#id_password", "provider password 1").await;
    click(&browser, "#signin").await;
    // Back in the dashboard, on the page it asked for, as the new admin.
    see(&browser, "h1", "Servers").await;
    see(&browser, "form.logout span", "ada").await;
    assert!(
        browser
            .current_url()
            .await
            .unwrap()
            .as_str()
            .ends_with("/admin/servers"),
        "the page it wanted"
    );

    // The account the provider's claims made: admin by group, its groups kept.
    let (status, ada) = env.call(Method::GET, "/api/v1/users/ada", None).await;
    assert_eq!(status, StatusCode::OK, "{ada}");
    assert_eq!(ada["email"], "ada@example.org");
    assert_eq!(ada["role"], "admin");
    assert_eq!(ada["groups"], json!(["berth-admins", "physics"]));
    let (status, identities) = env
        .call(Method::GET, "/api/v1/users/ada/identities", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(identities.as_array().unwrap().len(), 1, "{identities}");
    assert_eq!(identities[0]["provider"], "corp");
    assert_eq!(identities[0]["email"], "ada@example.org");

    // The user's page shows the identity.
    browser
        .goto(&format!("{}/admin/users/ada", env.base))
        .await
        .unwrap();
    see(
        &browser,
        "#user-identities tr[data-provider='corp']",
        "Test IdP (corp)",
    )
    .await;

    // Logged out of Berth, signing in again (the provider remembers the browser)
    // comes back to the same account, not a new one.
    click(&browser, "form.logout button").await;
    see(&browser, "a[data-provider='corp']", "Sign in with").await;
    click(&browser, "a[data-provider='corp']").await;
    see(&browser, "h1", "Overview").await;
    see(&browser, "form.logout span", "ada").await;
    let (_, users) = env.call(Method::GET, "/api/v1/users", None).await;
    let names: Vec<&str> = users
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|u| u["name"].as_str())
        .collect();
    assert_eq!(
        names.iter().filter(|n| n.starts_with("ada")).count(),
        1,
        "{names:?}"
    );

    let audit = audit_actions(&env).await;
    let oidc_logins = audit
        .iter()
        .filter(|e| e["action"] == "login_succeeded" && e["detail"]["method"] == "oidc")
        .count();
    assert_eq!(oidc_logins, 2, "{audit:?}");
    assert!(
        audit
            .iter()
            .any(|e| e["action"] == "user_registered" && e["target"] == "ada"),
        "{audit:?}"
    );
    browser.close().await.unwrap();
}

#[tokio::test]
async fn forged_replayed_and_cross_browser_callbacks_are_refused() {
    let mut idp = Idp::pick();
    let corp = idp.provider("corp", "berth", json!({ "allow_signup": true }));
    let providers = json!([corp]).to_string();
    let env = TestEnv::start_with(&["--oidc-providers", &providers]).await;
    idp.start(
        &env.base,
        &["berth"],
        json!([user("ann", "ann@example.org", &[])]),
    )
    .await;
    let start = "/api/v1/auth/oidc/corp/start";

    // A callback URL sent to someone else's browser (without the cookie that
    // binds the sign-in) is refused, and spent: the first browser cannot use it
    // after that either.
    let mut ann = Jar::new();
    let url = callback_url(&mut ann, &env, start, "ann").await;
    let mut other = Jar::new();
    let (status, page) = text_of(other.get(&url).await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{page}");
    assert!(page.contains("begun in another browser"), "{page}");
    let (status, page) = text_of(ann.get(&url).await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{page}");
    assert!(page.contains("was used already"), "{page}");
    // A browser with a cookie of its own, not this sign-in's, is refused too.
    let mut third = Jar::new();
    begin(&mut third, &env, start).await;
    let url = callback_url(&mut ann, &env, start, "ann").await;
    let (status, page) = text_of(third.get(&url).await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{page}");
    assert!(page.contains("begun in another browser"), "{page}");

    // A state Berth never sent.
    let url = callback_url(&mut ann, &env, start, "ann").await;
    let forged = with_query(&url, "state", "forged-state-0123456789");
    let (status, page) = text_of(ann.get(&forged).await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{page}");
    assert!(page.contains("unknown"), "{page}");

    // The real thing signs in; the same callback again is refused.
    let url = callback_url(&mut ann, &env, start, "ann").await;
    let spent_code = query_of(&url, "code");
    let response = ann.get(&url).await;
    let cookie = response
        .headers()
        .get(header::SET_COOKIE)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let (status, page) = text_of(response).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page.contains("signed in as ann"), "{page}");
    assert!(
        cookie.starts_with("berth_session=") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let token = ann.cookie("berth_session").unwrap().to_owned();
    let (status, me) = env
        .call_with(Method::GET, "/api/v1/auth/me", None, Some(&token))
        .await;
    assert_eq!(status, StatusCode::OK, "{me}");
    assert_eq!(me["user"]["name"], "ann");
    let (status, page) = text_of(ann.get(&url).await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{page}");
    assert!(page.contains("was used already"), "{page}");

    // A code of another sign-in, under this one's state: the provider refuses it
    // (PKCE: this sign-in's verifier is not the one its challenge was made from).
    let authorize_c = begin(&mut ann, &env, start).await;
    let authorize_d = begin(&mut ann, &env, start).await;
    let url_c = at_provider(&mut ann, &env, authorize_c, "ann").await;
    let state_d = query_of(&authorize_d, "state");
    let swapped = with_query(&url_c, "state", &state_d);
    let (status, page) = text_of(ann.get(&swapped).await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{page}");
    assert!(page.contains("did not accept the code"), "{page}");
    // A code that was spent already, under a fresh sign-in's state.
    let authorize_e = begin(&mut ann, &env, start).await;
    let replayed = with_query(
        &with_query(&url_c, "state", &query_of(&authorize_e, "state")),
        "code",
        &spent_code,
    );
    let (status, page) = text_of(ann.get(&replayed).await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{page}");
    assert!(page.contains("did not accept the code"), "{page}");

    // The provider's refusal is shown as such.
    let authorize_f = begin(&mut ann, &env, start).await;
    let denied = format!(
        "{}/api/v1/auth/oidc/corp/callback?state={}&error=access_denied&error_description=no",
        env.base,
        query_of(&authorize_f, "state")
    );
    let (status, page) = text_of(ann.get(&denied).await).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{page}");
    assert!(
        page.contains("did not sign you in (access_denied: no)"),
        "{page}"
    );

    // A script's call gets JSON errors; a provider Berth does not know is 404.
    let (status, body) = env
        .call_with(
            Method::GET,
            "/api/v1/auth/oidc/corp/callback?state=x&code=y",
            None,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "bad_request", "{body}");
    let (status, body) = env
        .call_with(Method::GET, "/api/v1/auth/oidc/nope/start", None, None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    // Exactly one session came of all this, and every refusal is in the audit log.
    let audit = audit_actions(&env).await;
    let logins = audit
        .iter()
        .filter(|e| e["action"] == "login_succeeded")
        .count();
    assert_eq!(logins, 1, "{audit:?}");
    let refusals = audit
        .iter()
        .filter(|e| e["action"] == "oidc_refused")
        .count();
    assert!(refusals >= 8, "{refusals} refusals audited: {audit:?}");
}

#[tokio::test]
async fn sign_up_follows_the_provider_s_rules_and_never_takes_an_existing_account() {
    let mut idp = Idp::pick();
    let open = idp.provider(
        "open",
        "berth",
        json!({ "allow_signup": true, "allowed_domains": ["example.org"] }),
    );
    let closed = idp.provider("closed", "berth-closed", json!({}));
    let providers = json!([open, closed]).to_string();
    let env = TestEnv::start_with(&["--oidc-providers", &providers]).await;
    let mut unverified = user("uma", "uma@example.org", &[]);
    unverified["email_verified"] = json!(false);
    idp.start(
        &env.base,
        &["berth", "berth-closed"],
        json!([
            user("ann", "ann@example.org", &[]),
            user("eve", "eve@elsewhere.net", &[]),
            unverified,
            user("bob", "bob@example.org", &[]),
            user(ADMIN_USER, "boss@example.org", &[]),
        ]),
    )
    .await;
    // A local account with bob's address.
    let (status, body) = env
        .call(
            Method::POST,
            "/api/v1/admin/users",
            Some(
                &json!({ "username": "robert", "email": "bob@example.org",
                          "password": "local password 1" })
                .to_string(),
            ),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    let sign_in = async |provider: &str, who: &str| {
        let mut jar = Jar::new();
        let start = format!("/api/v1/auth/oidc/{provider}/start");
        let url = callback_url(&mut jar, &env, &start, who).await;
        text_of(jar.get(&url).await).await
    };
    let (status, page) = sign_in("closed", "ann").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{page}");
    assert!(page.contains("no Berth account is linked"), "{page}");
    let (status, page) = sign_in("open", "eve").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{page}");
    assert!(
        page.contains("elsewhere.net addresses are not created"),
        "{page}"
    );
    let (status, page) = sign_in("open", "uma").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{page}");
    assert!(page.contains("verified email"), "{page}");
    // Never linked to a local account by email alone.
    let (status, page) = sign_in("open", "bob").await;
    assert_eq!(status, StatusCode::CONFLICT, "{page}");
    assert!(
        page.contains("an account with the email bob@example.org exists"),
        "{page}"
    );
    let (_, identities) = env
        .call(Method::GET, "/api/v1/users/robert/identities", None)
        .await;
    assert_eq!(identities, json!([]));

    let (status, page) = sign_in("open", "ann").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    // The bootstrap admin's name is never given to a provider's user.
    let (status, page) = sign_in("open", ADMIN_USER).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(
        page.contains(&format!("signed in as {ADMIN_USER}-2")),
        "{page}"
    );

    let (_, users) = env.call(Method::GET, "/api/v1/users", None).await;
    let mut names: Vec<&str> = users
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|u| u["name"].as_str())
        .collect();
    names.sort();
    assert_eq!(names, ["ann", "robert", "root", "root-2"]);
    let (_, ann) = env.call(Method::GET, "/api/v1/users/ann", None).await;
    assert_eq!(ann["role"], "user");
    assert_eq!(ann["email"], "ann@example.org");

    // Ann's only way in is her identity: it is not unlinked.
    let (status, body) = env
        .call(Method::DELETE, "/api/v1/users/ann/identities/open", None)
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("only way in"),
        "{body}"
    );
    let audit = audit_actions(&env).await;
    let refused = audit
        .iter()
        .filter(|e| e["action"] == "signup_refused")
        .count();
    assert_eq!(refused, 4, "{audit:?}");
}

#[tokio::test]
async fn a_portal_exchanges_its_code_once_and_a_user_links_and_unlinks_an_identity() {
    let mut idp = Idp::pick();
    let corp = idp.provider("corp", "berth", json!({}));
    let providers = json!([corp]).to_string();
    let portal = "http://portal.example.test:9000";
    let env =
        TestEnv::start_with(&["--oidc-providers", &providers, "--cors-origins", portal]).await;
    idp.start(
        &env.base,
        &["berth"],
        json!([user("carl-at-corp", "carl@example.org", &[])]),
    )
    .await;
    for (name, password) in [("dora", "dora's password 1"), ("carl", "carl's password 1")] {
        let body = json!({ "username": name, "password": password }).to_string();
        let (status, body) = env
            .call(Method::POST, "/api/v1/admin/users", Some(&body))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }

    // Not linked yet, and the provider may not create accounts: refused.
    let mut jar = Jar::new();
    let url = callback_url(
        &mut jar,
        &env,
        "/api/v1/auth/oidc/corp/start",
        "carl-at-corp",
    )
    .await;
    assert_eq!(jar.get(&url).await.status(), StatusCode::FORBIDDEN);

    // Carl proves both: his session starts the link, the provider the identity.
    // Finished in another browser, the link is refused.
    let carl = env.login("carl", "carl's password 1").await;
    let link = async |jar: &mut Jar, token: &str| {
        let request = jar
            .http
            .post(format!("{}/api/v1/auth/oidc/corp/link", env.base))
            .bearer_auth(token);
        let response = jar.send(request).await;
        assert_eq!(response.status(), StatusCode::OK);
        let body: Value = response.json().await.unwrap();
        body["authorization_url"].as_str().unwrap().to_owned()
    };
    let mut carl_browser = Jar::new();
    let authorize = link(&mut carl_browser, &carl).await;
    let url = at_provider(&mut carl_browser, &env, authorize, "carl-at-corp").await;
    let (status, page) = text_of(Jar::new().get(&url).await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{page}");
    let authorize = link(&mut carl_browser, &carl).await;
    let url = at_provider(&mut carl_browser, &env, authorize, "carl-at-corp").await;
    let (status, page) = text_of(carl_browser.get(&url).await).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page.contains("linked to the account carl"), "{page}");
    let (_, identities) = env
        .call_with(
            Method::GET,
            "/api/v1/users/carl/identities",
            None,
            Some(&carl),
        )
        .await;
    assert_eq!(identities.as_array().unwrap().len(), 1, "{identities}");
    assert_eq!(identities[0]["email"], "carl@example.org");
    // Another user cannot see or take it.
    let dora = env.login("dora", "dora's password 1").await;
    let (status, _) = env
        .call_with(
            Method::GET,
            "/api/v1/users/carl/identities",
            None,
            Some(&dora),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let mut dora_browser = Jar::new();
    let authorize = link(&mut dora_browser, &dora).await;
    let url = at_provider(&mut dora_browser, &env, authorize, "carl-at-corp").await;
    let (status, page) = text_of(dora_browser.get(&url).await).await;
    assert_eq!(status, StatusCode::CONFLICT, "{page}");
    assert!(page.contains("linked to another account"), "{page}");

    // Now the identity signs carl in, here for a portal: a code it exchanges
    // once for a session.
    let mut jar = Jar::new();
    let start = format!(
        "/api/v1/auth/oidc/corp/start?return_to={}",
        encode(&format!("{portal}/signed-in?x=1"))
    );
    let url = callback_url(&mut jar, &env, &start, "carl-at-corp").await;
    let response = jar.get(&url).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let back = location(&response);
    assert!(
        back.starts_with(&format!("{portal}/signed-in?x=1&code=")),
        "{back}"
    );
    let code = query_of(&back, "code");
    let exchange = json!({ "code": code }).to_string();
    let (status, session) = env
        .call_with(
            Method::POST,
            "/api/v1/auth/oidc/exchange",
            Some(&exchange),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{session}");
    assert_eq!(session["user"]["name"], "carl");
    let token = session["access_token"].as_str().unwrap();
    let (_, me) = env
        .call_with(Method::GET, "/api/v1/auth/me", None, Some(token))
        .await;
    assert_eq!(me["user"]["name"], "carl");
    let (status, body) = env
        .call_with(
            Method::POST,
            "/api/v1/auth/oidc/exchange",
            Some(&exchange),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    // Only the operator's portals: anywhere else is refused before the provider.
    let (status, body) = env
        .call_with(
            Method::GET,
            "/api/v1/auth/oidc/corp/start?return_to=https%3A%2F%2Fevil.example%2F",
            None,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, _) = env
        .call_with(
            Method::GET,
            "/api/v1/auth/oidc/corp/start?next=https%3A%2F%2Fevil.example%2Fadmin",
            None,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // A server's URL as next: a proxy session scoped to carl's servers.
    let mut jar = Jar::new();
    let next = encode(&format!("{}/user/carl/", env.base));
    let url = callback_url(
        &mut jar,
        &env,
        &format!("/api/v1/auth/oidc/corp/start?next={next}"),
        "carl-at-corp",
    )
    .await;
    let response = jar.get(&url).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&response), format!("{}/user/carl/", env.base));
    let cookie = response.headers()[header::SET_COOKIE].to_str().unwrap();
    assert!(cookie.contains("Path=/user/carl/"), "{cookie}");

    // Unlinked (carl has a password, so it is not his only way in): the
    // identity signs in no one.
    let (status, body) = env
        .call_with(
            Method::DELETE,
            "/api/v1/users/carl/identities/corp",
            None,
            Some(&carl),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let mut jar = Jar::new();
    let url = callback_url(
        &mut jar,
        &env,
        "/api/v1/auth/oidc/corp/start",
        "carl-at-corp",
    )
    .await;
    assert_eq!(jar.get(&url).await.status(), StatusCode::FORBIDDEN);
    let audit = audit_actions(&env).await;
    for action in ["identity_linked", "identity_unlinked", "oidc_handoff"] {
        assert!(
            audit.iter().any(|e| e["action"] == action),
            "{action}: {audit:?}"
        );
    }
}
