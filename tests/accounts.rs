//! Accounts through HTTP: registration, login, roles, tokens, SSO, throttling, audit.

mod common;

use std::time::Duration;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use common::{ADMIN_PASSWORD, ADMIN_USER, Backend, TestEnv, wait_for};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const PASSWORD: &str = "a long enough password";

async fn as_user(
    env: &TestEnv,
    token: &str,
    method: Method,
    path: &str,
    body: Option<&str>,
) -> (StatusCode, Value) {
    env.call_with(method, path, body, Some(token)).await
}

fn assert_error(status: StatusCode, body: &Value, expected: StatusCode, code: &str) {
    assert_eq!(status, expected, "{body}");
    assert_eq!(body["error"], code, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

async fn users_register_log_in_act_on_their_own_servers_and_log_out(backend: Backend) {
    let env = TestEnv::on(backend).await;
    let ann = env.user("ann");
    let bob = env.user("bob");
    let ann_token = env.register(&ann, PASSWORD).await;
    let bob_token = env.register(&bob, PASSWORD).await;

    let (status, me) = as_user(&env, &ann_token, Method::GET, "/api/v1/auth/me", None).await;
    assert_eq!(status, StatusCode::OK, "{me}");
    assert_eq!(me["user"]["name"], ann.as_str());
    assert_eq!(me["user"]["role"], "user");
    assert!(
        me["user"].get("password_hash").is_none() && !me.to_string().contains("argon2"),
        "{me}"
    );

    // Ann starts her own server; the job is hers to see.
    let (status, spawn) = as_user(
        &env,
        &ann_token,
        Method::POST,
        &format!("/api/v1/users/{ann}/server"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{spawn}");
    let job = spawn["job_id"].as_str().unwrap();
    let (status, _) = as_user(
        &env,
        &ann_token,
        Method::GET,
        &format!("/api/v1/jobs/{job}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);

    // Bob can neither see nor touch Ann's servers, her jobs, or the user list.
    for (method, path) in [
        (Method::GET, format!("/api/v1/users/{ann}/server")),
        (Method::POST, format!("/api/v1/users/{ann}/server")),
        (Method::DELETE, format!("/api/v1/users/{ann}/server")),
        (Method::POST, format!("/api/v1/users/{ann}/servers/lab")),
        (Method::GET, format!("/api/v1/users/{ann}")),
        (Method::DELETE, format!("/api/v1/users/{ann}")),
        (Method::GET, format!("/api/v1/jobs/{job}")),
        (Method::GET, "/api/v1/users".to_string()),
        (Method::GET, "/api/v1/admin/users".to_string()),
        (Method::POST, format!("/api/v1/users/{ann}/server/sso")),
    ] {
        let (status, body) = as_user(&env, &bob_token, method.clone(), &path, None).await;
        assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    }
    let (_, still) = env
        .call(Method::GET, &format!("/api/v1/users/{ann}/server"), None)
        .await;
    assert_eq!(
        still["state"], "pending_spawn",
        "Bob's attempts changed nothing: {still}"
    );

    // Logging in by email works as by name.
    let email = format!("{bob}@example.org");
    let admin = env.login(ADMIN_USER, ADMIN_PASSWORD).await;
    let carl = env.user("carl");
    let body = json!({ "username": carl, "email": email, "password": PASSWORD }).to_string();
    let (status, created) = as_user(
        &env,
        &admin,
        Method::POST,
        "/api/v1/admin/users",
        Some(&body),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let by_email = env.login(&email.to_uppercase(), PASSWORD).await;
    let (_, me) = as_user(&env, &by_email, Method::GET, "/api/v1/auth/me", None).await;
    assert_eq!(me["user"]["name"], carl.as_str());

    // Logout revokes the token at once; another session of the same user lives on.
    let second = env.login(&ann, PASSWORD).await;
    let (status, _) = as_user(&env, &ann_token, Method::POST, "/api/v1/auth/logout", None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = as_user(&env, &ann_token, Method::GET, "/api/v1/auth/me", None).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");
    assert!(
        body["message"].as_str().unwrap().contains("revoked"),
        "{body}"
    );
    let (status, _) = as_user(&env, &second, Method::GET, "/api/v1/auth/me", None).await;
    assert_eq!(status, StatusCode::OK);

    // A password change ends the other sessions and the old password.
    let third = env.login(&ann, PASSWORD).await;
    let change = json!({ "current_password": PASSWORD, "new_password": "another long password" })
        .to_string();
    let (status, body) = as_user(
        &env,
        &third,
        Method::POST,
        "/api/v1/auth/password",
        Some(&change),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (status, _) = as_user(&env, &second, Method::GET, "/api/v1/auth/me", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = as_user(&env, &third, Method::GET, "/api/v1/auth/me", None).await;
    assert_eq!(status, StatusCode::OK);
    let old = json!({ "username": ann, "password": PASSWORD }).to_string();
    let (status, body) = env
        .call_with(Method::POST, "/api/v1/auth/login", Some(&old), None)
        .await;
    assert_error(
        status,
        &body,
        StatusCode::UNAUTHORIZED,
        "invalid_credentials",
    );
    env.login(&ann, "another long password").await;
}

async fn admins_page_users_change_roles_deactivate_and_delete(backend: Backend) {
    let env = TestEnv::on(backend).await;
    let admin = env.login(ADMIN_USER, ADMIN_PASSWORD).await;
    let mut names = vec![];
    for i in 0..5 {
        let name = env.user(&format!("u{i}"));
        env.register(&name, PASSWORD).await;
        names.push(name);
    }
    let (status, page) = as_user(
        &env,
        &admin,
        Method::GET,
        "/api/v1/admin/users?page=2&per_page=2",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["total"], 6, "five users and the admin: {page}");
    assert_eq!(page["users"].as_array().unwrap().len(), 2);
    assert_eq!(
        page["users"][0]["name"],
        names[1].as_str(),
        "sorted by name: {page}"
    );
    let (_, found) = as_user(
        &env,
        &admin,
        Method::GET,
        &format!("/api/v1/admin/users?q={}", names[3]),
        None,
    )
    .await;
    assert_eq!(found["total"], 1, "{found}");
    let (status, body) = as_user(
        &env,
        &admin,
        Method::GET,
        "/api/v1/admin/users?page=0",
        None,
    )
    .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "bad_request");

    // Promotion takes effect on the user's existing token, at once.
    let target = &names[0];
    let token = env.login(target, PASSWORD).await;
    let (status, _) = as_user(&env, &token, Method::GET, "/api/v1/users", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let path = format!("/api/v1/admin/users/{target}");
    let (status, user) = as_user(
        &env,
        &admin,
        Method::PATCH,
        &path,
        Some(r#"{"role": "admin"}"#),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{user}");
    assert_eq!(user["admin"], true);
    let (status, _) = as_user(&env, &token, Method::GET, "/api/v1/users", None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = as_user(
        &env,
        &admin,
        Method::PATCH,
        &path,
        Some(r#"{"role": "root"}"#),
    )
    .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "bad_request");

    // Deactivation ends sessions and refuses logins.
    let (status, user) = as_user(
        &env,
        &admin,
        Method::PATCH,
        &path,
        Some(r#"{"active": false}"#),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{user}");
    assert_eq!(user["active"], false);
    let (status, _) = as_user(&env, &token, Method::GET, "/api/v1/auth/me", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // The right password and a wrong one get the same answer: no oracle.
    let answer = async |password: &str| {
        let login = json!({ "username": target, "password": password }).to_string();
        env.call_with(Method::POST, "/api/v1/auth/login", Some(&login), None)
            .await
    };
    let (status, right) = answer(PASSWORD).await;
    assert_error(
        status,
        &right,
        StatusCode::UNAUTHORIZED,
        "invalid_credentials",
    );
    let (status, wrong) = answer("not the password at all").await;
    assert_eq!((status, &wrong), (StatusCode::UNAUTHORIZED, &right));

    // Delete enqueues the cleanup job.
    let (status, removal) = as_user(
        &env,
        &admin,
        Method::DELETE,
        &format!("/api/v1/admin/users/{}", names[4]),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{removal}");
    assert_eq!(removal["job"]["kind"], "cleanup");

    // Every security event is in the audit log, with who, what and from where.
    let (status, audit) = as_user(
        &env,
        &admin,
        Method::GET,
        "/api/v1/admin/audit?per_page=500",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let entries = audit["entries"].as_array().unwrap();
    for action in [
        "user_registered",
        "login_succeeded",
        "login_failed",
        "role_changed",
        "user_deactivated",
        "user_deleted",
    ] {
        let entry = entries
            .iter()
            .find(|e| e["action"] == action)
            .unwrap_or_else(|| panic!("no {action} in {audit}"));
        assert_eq!(entry["client_addr"], "127.0.0.1", "{entry}");
        assert!(entry["at"].is_string());
    }
    // The log tells the operator what the answer did not tell the guesser.
    let refused = entries
        .iter()
        .find(|e| e["action"] == "login_failed" && e["detail"]["reason"] == "deactivated")
        .unwrap_or_else(|| panic!("no refused login of a deactivated account in {audit}"));
    assert_eq!(refused["target"], target.as_str(), "{refused}");
    let change = entries
        .iter()
        .find(|e| e["action"] == "role_changed")
        .unwrap();
    assert_eq!(change["actor"], format!("user:{ADMIN_USER}"));
    assert_eq!(change["target"], target.as_str());
}

async fn verify(env: &TestEnv, token: &str, check: &str) -> (StatusCode, Value) {
    as_user(env, token, Method::POST, "/api/v1/sso/verify", Some(check)).await
}

fn forge(env: &TestEnv, claims: Value) -> String {
    let key = EncodingKey::from_ed_pem(env.jwt_pem.as_bytes()).unwrap();
    jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &key).unwrap()
}

async fn expired_revoked_tampered_unsigned_and_foreign_tokens_get_401(backend: Backend) {
    let env = TestEnv::on(backend).await;
    let ann = env.user("ann");
    let good = env.register(&ann, PASSWORD).await;
    let (status, _) = as_user(&env, &good, Method::GET, "/api/v1/auth/me", None).await;
    assert_eq!(status, StatusCode::OK);

    let now = chrono::Utc::now().timestamp();
    let payload: Value = {
        let middle = good.split('.').nth(1).unwrap();
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(middle).unwrap()).unwrap()
    };
    let jti = payload["jti"].clone();

    // Signed with the right key, but expired an hour ago.
    let expired = forge(
        &env,
        json!({ "sub": ann, "role": "user", "iat": now - 7200, "exp": now - 3600, "jti": jti, "iss": "berth" }),
    );
    // The payload changed after signing: made admin.
    let tampered = {
        let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
        let mut claims = payload.clone();
        claims["role"] = json!("admin");
        claims["sub"] = json!(ADMIN_USER);
        parts[1] = URL_SAFE_NO_PAD.encode(claims.to_string());
        parts.join(".")
    };
    // `alg: none`, no signature.
    let unsigned = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(payload.to_string())
    );
    // HS256 "signed" with the public key set, the classic confusion attack.
    let (_, jwks) = env
        .call_with(Method::GET, "/api/v1/auth/jwks", None, None)
        .await;
    assert_eq!(jwks["keys"][0]["alg"], "EdDSA", "{jwks}");
    let hmac = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &payload,
        &EncodingKey::from_secret(jwks["keys"][0]["x"].as_str().unwrap().as_bytes()),
    )
    .unwrap();
    // Well formed, signed by another key.
    let foreign = {
        let other = common::new_signing_key();
        let key = EncodingKey::from_ed_pem(other.as_bytes()).unwrap();
        jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &payload, &key).unwrap()
    };
    // Signed by the right key for a session that never existed.
    let sessionless = forge(
        &env,
        json!({ "sub": ann, "role": "user", "iat": now, "exp": now + 600, "jti": uuid::Uuid::new_v4(), "iss": "berth" }),
    );

    for (what, token) in [
        ("expired", &expired),
        ("tampered", &tampered),
        ("alg none", &unsigned),
        ("hmac", &hmac),
        ("foreign key", &foreign),
        ("no session", &sessionless),
        ("garbage", &"not.a.token".to_string()),
        ("unknown service token", &"bt_0123456789abcdef".to_string()),
    ] {
        let (status, body) = as_user(&env, token, Method::GET, "/api/v1/auth/me", None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {body}");
        assert_eq!(body["error"], "unauthorized", "{what}: {body}");
    }
    let (_, body) = as_user(&env, &expired, Method::GET, "/api/v1/auth/me", None).await;
    assert!(
        body["message"].as_str().unwrap().contains("expired"),
        "{body}"
    );

    let (status, _) = as_user(&env, &good, Method::POST, "/api/v1/auth/logout", None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = as_user(&env, &good, Method::GET, "/api/v1/auth/me", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "revoked");
}

async fn service_tokens_carry_scopes_are_shown_once_and_can_be_revoked(backend: Backend) {
    let env = TestEnv::on(backend).await;
    let admin = env.login(ADMIN_USER, ADMIN_PASSWORD).await;
    let ann = env.user("ann");
    env.register(&ann, PASSWORD).await;

    let body =
        json!({ "name": "monitoring", "scopes": ["servers:read", "users:read"] }).to_string();
    let (status, created) = as_user(
        &env,
        &admin,
        Method::POST,
        "/api/v1/admin/tokens",
        Some(&body),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let token = created["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("bt_"));
    let (stored,): (String,) = env
        .rows::<(String,)>("select token_hash from api_tokens")
        .await[0]
        .clone();
    assert!(!stored.contains(&token[3..]), "only a hash is stored");

    let (status, _) = as_user(&env, &token, Method::GET, "/api/v1/users", None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = as_user(
        &env,
        &token,
        Method::POST,
        &format!("/api/v1/users/{ann}/server"),
        None,
    )
    .await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    assert!(
        body["message"].as_str().unwrap().contains("servers:write"),
        "{body}"
    );
    let (status, body) = as_user(&env, &token, Method::GET, "/api/v1/admin/tokens", None).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");

    let (_, listed) = as_user(&env, &admin, Method::GET, "/api/v1/admin/tokens", None).await;
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert!(
        listed[0].get("token").is_none(),
        "never shown again: {listed}"
    );
    assert!(listed[0]["last_used"].is_string(), "{listed}");

    for bad in [
        json!({ "name": "x", "scopes": ["root"] }),
        json!({ "name": "x", "scopes": [] }),
        json!({ "name": "", "scopes": ["admin"] }),
        json!({ "name": "x", "scopes": ["admin"], "expires_in": -5 }),
        json!({ "name": "x" }),
    ] {
        let (status, body) = as_user(
            &env,
            &admin,
            Method::POST,
            "/api/v1/admin/tokens",
            Some(&bad.to_string()),
        )
        .await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, "bad_request");
    }

    let id = created["id"].as_str().unwrap();
    let (status, _) = as_user(
        &env,
        &admin,
        Method::DELETE,
        &format!("/api/v1/admin/tokens/{id}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = as_user(&env, &token, Method::GET, "/api/v1/users", None).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");
    let (status, _) = as_user(
        &env,
        &admin,
        Method::DELETE,
        &format!("/api/v1/admin/tokens/{id}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (_, audit) = as_user(&env, &admin, Method::GET, "/api/v1/admin/audit", None).await;
    let actions: Vec<&str> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert!(
        actions.contains(&"token_created") && actions.contains(&"token_revoked"),
        "{actions:?}"
    );
}

async fn login_throttling_starts_after_repeated_failures_and_clears(backend: Backend) {
    let env = TestEnv::on_with(
        backend,
        &["--login-max-failures", "3", "--login-throttle-window", "2"],
    )
    .await;
    let ann = env.user("ann");
    env.register(&ann, PASSWORD).await;
    let wrong = json!({ "username": ann, "password": "not the password" }).to_string();
    let right = json!({ "username": ann, "password": PASSWORD }).to_string();
    let ghost =
        json!({ "username": env.user("ghost"), "password": "not the password" }).to_string();

    // An unknown account and a wrong password get the very same answer.
    let (status_a, body_a) = env
        .call_with(Method::POST, "/api/v1/auth/login", Some(&ghost), None)
        .await;
    let (status_b, body_b) = env
        .call_with(Method::POST, "/api/v1/auth/login", Some(&wrong), None)
        .await;
    assert_eq!((status_a, &body_a), (status_b, &body_b));
    assert_error(
        status_b,
        &body_b,
        StatusCode::UNAUTHORIZED,
        "invalid_credentials",
    );

    for _ in 0..2 {
        let (status, _) = env
            .call_with(Method::POST, "/api/v1/auth/login", Some(&wrong), None)
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    // Locked: even the right password waits.
    let response = env
        .http()
        .post(format!("{}/api/v1/auth/login", env.base))
        .header("content-type", "application/json")
        .body(right.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "too_many_requests");

    tokio::time::sleep(Duration::from_secs(retry_after) + Duration::from_millis(200)).await;
    let (status, body) = env
        .call_with(Method::POST, "/api/v1/auth/login", Some(&right), None)
        .await;
    assert_eq!(status, StatusCode::OK, "cleared after the window: {body}");
}

async fn fifty_concurrent_registrations_of_one_name_make_one_user(backend: Backend) {
    let env = TestEnv::on_with(backend, &["--password-checks", "8"]).await;
    let name = env.user("rush");
    let body = json!({ "username": name, "password": PASSWORD }).to_string();
    let answers = futures::future::join_all(
        (0..50).map(|_| env.call_with(Method::POST, "/api/v1/auth/register", Some(&body), None)),
    )
    .await;
    let created = answers
        .iter()
        .filter(|(s, _)| *s == StatusCode::CREATED)
        .count();
    let conflicts = answers
        .iter()
        .filter(|(s, b)| *s == StatusCode::CONFLICT && b["error"] == "conflict")
        .count();
    // On a loaded machine a few may be told to come back (503: no password check
    // free within a second); none may be a second account.
    let busy = answers
        .iter()
        .filter(|(s, _)| *s == StatusCode::SERVICE_UNAVAILABLE)
        .count();
    assert_eq!(created, 1, "{answers:?}");
    assert_eq!(conflicts + busy, 49, "{answers:?}");
    let users: Vec<(String,)> = env.rows("select name from users").await;
    assert_eq!(users.iter().filter(|(n,)| *n == name).count(), 1);
}

async fn bad_registrations_get_clear_errors_and_write_nothing(backend: Backend) {
    let env = TestEnv::on(backend).await;
    let ok_name = env.user("ok");
    let taken = env.user("taken");
    env.register(&taken, PASSWORD).await;
    let before: i64 = env.count("select count(*) from users").await;

    for (body, code) in [
        (
            json!({ "username": "Not_Dns", "password": PASSWORD }).to_string(),
            "invalid_name",
        ),
        (
            json!({ "username": ok_name, "password": "short" }).to_string(),
            "bad_request",
        ),
        (
            json!({ "username": ok_name, "password": "aaaaaaaaaaaaaaa" }).to_string(),
            "bad_request",
        ),
        (
            json!({ "username": ok_name, "password": PASSWORD, "email": "no-at-sign" }).to_string(),
            "bad_request",
        ),
        (
            json!({ "username": ok_name, "password": PASSWORD, "email": "a b@c.d" }).to_string(),
            "bad_request",
        ),
        (
            json!({ "username": ok_name, "password": PASSWORD, "email": "a\u{0}b@c.de" })
                .to_string(),
            "bad_request",
        ),
        (
            json!({ "username": ok_name, "password": PASSWORD, "email": "<script>x</script>@c.de" })
                .to_string(),
            "bad_request",
        ),
        (
            json!({ "username": ok_name, "password": PASSWORD, "email": "a@c..de" }).to_string(),
            "bad_request",
        ),
        (
            json!([ok_name, PASSWORD]).to_string(),
            "bad_request",
        ),
        ("[]".to_string(), "bad_request"),
        (json!({ "username": ok_name }).to_string(), "bad_request"),
        (
            json!({ "username": ok_name, "password": PASSWORD, "admin": true }).to_string(),
            "bad_request",
        ),
        (
            json!({ "username": 42, "password": PASSWORD }).to_string(),
            "bad_request",
        ),
        ("{\"username\": ".to_string(), "bad_request"),
        (String::new(), "bad_request"),
        (
            json!({ "username": taken, "password": PASSWORD }).to_string(),
            "conflict",
        ),
    ] {
        let (status, answer) = env
            .call_with(Method::POST, "/api/v1/auth/register", Some(&body), None)
            .await;
        assert_eq!(answer["error"], code, "{body}: {answer}");
        assert!(status.is_client_error(), "{body}: {status}");
    }
    let after: i64 = env.count("select count(*) from users").await;
    assert_eq!(before, after);

    let closed = TestEnv::on_with(backend, &["--allow-registration", "false"]).await;
    let body = json!({ "username": ok_name, "password": PASSWORD }).to_string();
    let (status, answer) = closed
        .call_with(Method::POST, "/api/v1/auth/register", Some(&body), None)
        .await;
    assert_error(status, &answer, StatusCode::FORBIDDEN, "forbidden");
}

async fn a_user_past_the_per_user_server_limit_gets_429(backend: Backend) {
    let env = TestEnv::on_with(backend, &["--max-servers-per-user", "2"]).await;
    let ann = env.user("ann");
    let token = env.register(&ann, PASSWORD).await;
    for name in ["one", "two"] {
        let (status, body) = as_user(
            &env,
            &token,
            Method::POST,
            &format!("/api/v1/users/{ann}/servers/{name}"),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    }
    let (status, body) = as_user(
        &env,
        &token,
        Method::POST,
        &format!("/api/v1/users/{ann}/servers/three"),
        None,
    )
    .await;
    assert_error(
        status,
        &body,
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_requests",
    );
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("most allowed per user is 2"),
        "{body}"
    );
    // A repeat of a pending one is still fine: it is not a new server.
    let (status, _) = as_user(
        &env,
        &token,
        Method::POST,
        &format!("/api/v1/users/{ann}/servers/one"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let servers = env
        .count("select count(*) from servers where state = 'pending_spawn'")
        .await;
    assert_eq!(servers, 2);
}

async fn responses_carry_security_headers_and_cors_only_for_configured_origins(backend: Backend) {
    let env = TestEnv::on_with(backend, &["--cors-origins", "https://portal.example"]).await;
    let health = env
        .http()
        .get(format!("{}/health", env.base))
        .send()
        .await
        .unwrap();
    let headers = health.headers();
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert_eq!(headers["x-frame-options"], "DENY");
    assert_eq!(headers["referrer-policy"], "no-referrer");
    assert!(headers.contains_key("content-security-policy"));

    let preflight = |origin: &'static str| {
        env.http()
            .request(Method::OPTIONS, format!("{}/api/v1/auth/login", env.base))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .send()
    };
    let allowed = preflight("https://portal.example").await.unwrap();
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://portal.example"
    );
    let denied = preflight("https://evil.example").await.unwrap();
    assert!(!denied.headers().contains_key("access-control-allow-origin"));
}

#[test]
fn production_mode_refuses_to_start_without_a_signing_key_or_with_weak_secrets() {
    let url = std::env::var("BERTH_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/postgres".into());
    for (env, expected) in [
        (vec![], "BERTH_JWT_PRIVATE_KEY"),
        (
            vec![("BERTH_ADMIN_TOKEN", "short-but-16-chars!")],
            "BERTH_ADMIN_TOKEN",
        ),
        (
            vec![
                ("BERTH_ADMIN_USER", "root"),
                ("BERTH_ADMIN_PASSWORD", "weak"),
            ],
            "BERTH_ADMIN_PASSWORD",
        ),
    ] {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_berth"));
        command
            .args(["api", "--listen", "127.0.0.1:0"])
            .env("BERTH_ENV", "production")
            .env("BERTH_DATABASE_URL", &url)
            .env_remove("BERTH_ADMIN_TOKEN")
            .env_remove("BERTH_ADMIN_USER")
            .env_remove("BERTH_ADMIN_PASSWORD")
            .envs(env);
        if expected == "BERTH_JWT_PRIVATE_KEY" {
            command.env_remove("BERTH_JWT_PRIVATE_KEY");
        } else {
            command.env("BERTH_JWT_PRIVATE_KEY", common::new_signing_key());
        }
        let output = command.output().expect("berth runs");
        assert!(!output.status.success(), "it must not start ({expected})");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{expected}: {stderr}");
    }
}

async fn an_sso_hand_off_is_for_one_server_single_use_and_expires(backend: Backend) {
    let mut env = TestEnv::on(backend).await;
    env.start_worker(&[]);
    let ann = env.user("ann");
    let token = env.register(&ann, PASSWORD).await;
    let path = format!("/api/v1/users/{ann}/server");
    let (status, _) = as_user(&env, &token, Method::POST, &path, None).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let server = env
        .wait_server(&path, Duration::from_secs(30), |s| s["state"] == "running")
        .await;

    // The server authenticates with the token it was given in its environment.
    let server_token = env.container_env(&env.container(&ann), "BERTH_API_TOKEN");

    let (status, sso) = as_user(&env, &token, Method::POST, &format!("{path}/sso"), None).await;
    assert_eq!(status, StatusCode::OK, "{sso}");
    assert_eq!(sso["expires_in"], 300);
    let hand_off = sso["token"].as_str().unwrap().to_owned();
    let url = sso["url"].as_str().unwrap();
    assert!(
        url.starts_with(server["url"].as_str().unwrap()) && url.ends_with(&hand_off),
        "{url}"
    );

    let check = json!({ "token": hand_off }).to_string();
    let (status, who) = verify(&env, &server_token, &check).await;
    assert_eq!(status, StatusCode::OK, "{who}");
    assert_eq!(who, json!({ "user": ann, "server": "" }));
    let (status, body) = verify(&env, &server_token, &check).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");

    // Expired: the clock is moved past its five minutes.
    let (_, sso) = as_user(&env, &token, Method::POST, &format!("{path}/sso"), None).await;
    env.execute_at(
        "update sso_tokens set expires_at = $1 where used_at is null",
        chrono::Utc::now() - chrono::Duration::seconds(1),
    )
    .await;
    let check = json!({ "token": sso["token"] }).to_string();
    let (status, body) = verify(&env, &server_token, &check).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");

    // A user's own token cannot verify hand-offs; nor can anyone else mint one for Ann.
    let (_, sso) = as_user(&env, &token, Method::POST, &format!("{path}/sso"), None).await;
    let check = json!({ "token": sso["token"] }).to_string();
    let (status, body) = verify(&env, &token, &check).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    let bob = env.register(&env.user("bob"), PASSWORD).await;
    let (status, body) = as_user(&env, &bob, Method::POST, &format!("{path}/sso"), None).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    // The token survived the refused attempt and still works once.
    let (status, _) = verify(&env, &server_token, &check).await;
    assert_eq!(status, StatusCode::OK);

    // No hand-off to a server that is not running.
    let (status, body) = as_user(
        &env,
        &token,
        Method::POST,
        &format!("/api/v1/users/{ann}/servers/idle/sso"),
        None,
    )
    .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");

    // A hand-off made while the server ran is void once it stopped, even for a proxy.
    let (_, sso) = as_user(&env, &token, Method::POST, &format!("{path}/sso"), None).await;
    let check = json!({ "token": sso["token"] }).to_string();
    let (status, _) = as_user(&env, &token, Method::DELETE, &path, None).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    env.wait_server(&path, Duration::from_secs(30), |s| s["state"] == "stopped")
        .await;
    let (status, body) = verify(&env, common::TOKEN, &check).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");
}

/// The calling server is checked in the statement that spends a hand-off: another
/// server's attempt leaves the token for its own server.
async fn another_servers_attempt_leaves_an_sso_token_unspent(backend: Backend) {
    let mut env = TestEnv::on(backend).await;
    env.start_worker(&[]);
    let ann = env.user("ann");
    let token = env.register(&ann, PASSWORD).await;
    let mut tokens = vec![];
    for (path, container) in [
        (format!("/api/v1/users/{ann}/server"), env.container(&ann)),
        (
            format!("/api/v1/users/{ann}/servers/two"),
            env.container_of(&ann, "two"),
        ),
    ] {
        let (status, body) = as_user(&env, &token, Method::POST, &path, None).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        env.wait_server(&path, Duration::from_secs(30), |s| s["state"] == "running")
            .await;
        tokens.push((path, env.container_env(&container, "BERTH_API_TOKEN")));
    }
    let (default_path, default_token) = &tokens[0];
    let (_, two_token) = &tokens[1];
    let (_, sso) = as_user(
        &env,
        &token,
        Method::POST,
        &format!("{default_path}/sso"),
        None,
    )
    .await;
    let check = json!({ "token": sso["token"] }).to_string();
    let (status, body) = verify(&env, two_token, &check).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");
    let (status, who) = verify(&env, default_token, &check).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the token was left for its server: {who}"
    );
    assert_eq!(who, json!({ "user": ann, "server": "" }));
}

async fn a_registered_admin_name_is_not_promoted_at_restart(backend: Backend) {
    let mut env = TestEnv::on(backend).await;
    env.start_worker(&[]);
    let admin_path = format!("/api/v1/users/{ADMIN_USER}");
    let (status, body) = env.call(Method::DELETE, &admin_path, None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    wait_for(
        "the admin account to be gone",
        Duration::from_secs(30),
        async || env.call(Method::GET, &admin_path, None).await.0 == StatusCode::NOT_FOUND,
    )
    .await;

    // Nobody may register the bootstrap name for themselves.
    let body = json!({ "username": ADMIN_USER, "password": PASSWORD }).to_string();
    let (status, refused) = env
        .call_with(Method::POST, "/api/v1/auth/register", Some(&body), None)
        .await;
    assert_error(status, &refused, StatusCode::FORBIDDEN, "forbidden");
    assert!(
        refused["message"].as_str().unwrap().contains("reserved"),
        "{refused}"
    );

    // An ordinary account of that name (an admin made it) stays ordinary at restart.
    env.create_user(ADMIN_USER).await;
    env.start_another_api().await;
    let (_, user) = env.call(Method::GET, &admin_path, None).await;
    assert_eq!(user["role"], "user", "{user}");
    let login = json!({ "username": ADMIN_USER, "password": ADMIN_PASSWORD }).to_string();
    let (status, _) = env
        .call_with(Method::POST, "/api/v1/auth/login", Some(&login), None)
        .await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "the configured password is not given to it"
    );
}

async fn a_users_write_token_cannot_delete_an_admin(backend: Backend) {
    let env = TestEnv::on(backend).await;
    let body = json!({ "name": "provisioning", "scopes": ["users:write"] }).to_string();
    let (status, created) = env
        .call(Method::POST, "/api/v1/admin/tokens", Some(&body))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let token = created["token"].as_str().unwrap().to_owned();
    let admin_path = format!("/api/v1/users/{ADMIN_USER}");
    let (status, refused) = as_user(&env, &token, Method::DELETE, &admin_path, None).await;
    assert_error(status, &refused, StatusCode::FORBIDDEN, "forbidden");
    let (status, admin) = env.call(Method::GET, &admin_path, None).await;
    assert_eq!(status, StatusCode::OK, "the admin is still there: {admin}");
    assert_eq!(admin["state"], "active", "{admin}");
    // An ordinary account it may delete.
    let ann = env.user("ann");
    env.create_user(&ann).await;
    let (status, body) = as_user(
        &env,
        &token,
        Method::DELETE,
        &format!("/api/v1/users/{ann}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
}

async fn numbers_and_lengths_out_of_range_get_400_and_write_nothing(backend: Backend) {
    let env = TestEnv::on(backend).await;
    for expires_in in ["9e12", "9000000000000", "9223372036854775807", "0", "-5"] {
        let body =
            format!(r#"{{"name": "far", "scopes": ["servers:read"], "expires_in": {expires_in}}}"#);
        let (status, refused) = env
            .call(Method::POST, "/api/v1/admin/tokens", Some(&body))
            .await;
        assert_error(status, &refused, StatusCode::BAD_REQUEST, "bad_request");
    }
    let (_, tokens) = env.call(Method::GET, "/api/v1/admin/tokens", None).await;
    assert_eq!(
        tokens.as_array().map(Vec::len),
        Some(0),
        "nothing half-written: {tokens}"
    );
    let long = "a".repeat(60_000);
    for query in [
        format!("q={long}"),
        "page=9223372036854775807".to_string(),
        "page=2&per_page=9223372036854775807".to_string(),
    ] {
        let (status, refused) = env
            .call(Method::GET, &format!("/api/v1/admin/users?{query}"), None)
            .await;
        assert_error(status, &refused, StatusCode::BAD_REQUEST, "bad_request");
    }
    let (status, page) = env
        .call(Method::GET, "/api/v1/admin/users?page=1000000", None)
        .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the last page allowed is an empty page: {page}"
    );
}

async fn a_burst_of_logins_waits_for_password_checks_or_gets_503(backend: Backend) {
    // One check at a time, and a burst of distinct names from one address that the
    // throttle lets through, so that every login needs a check and the burst
    // overruns the bound on any machine (150 checks take seconds).
    const BURST: usize = 150;
    let env = TestEnv::on_with(
        backend,
        &[
            "--password-checks",
            "1",
            "--login-max-failures-per-address",
            "1000",
        ],
    )
    .await;
    let env = &env;
    let answers = futures::future::join_all((0..BURST).map(|i| async move {
        let login = json!({ "username": format!("nobody-{i}"), "password": PASSWORD });
        let response = env
            .http()
            .post(format!("{}/api/v1/auth/login", env.base))
            .header("content-type", "application/json")
            .body(login.to_string())
            .send()
            .await
            .expect("the API answers every login of the burst");
        let status = response.status();
        let retry = response.headers().get("retry-after").cloned();
        let body: Value = response.json().await.expect("a JSON answer");
        (status, retry, body)
    }))
    .await;
    let busy: Vec<_> = answers
        .iter()
        .filter(|(s, ..)| *s == StatusCode::SERVICE_UNAVAILABLE)
        .collect();
    assert!(
        !busy.is_empty(),
        "a burst past the bound is told to come back"
    );
    for (_, retry, body) in &busy {
        assert_eq!(retry.as_ref().map(|v| v.to_str().unwrap()), Some("1"));
        assert_eq!(body["error"], "unavailable", "{body}");
    }
    let checked = answers
        .iter()
        .filter(|(s, ..)| *s == StatusCode::UNAUTHORIZED)
        .count();
    assert!(checked > 0, "the logins that got a turn were checked");
    assert_eq!(busy.len() + checked, BURST, "no other answer: {answers:?}");
    // Once the burst is over, a login gets its turn again.
    let other = json!({ "username": "somebody-else", "password": PASSWORD }).to_string();
    let (status, body) = env
        .call_with(Method::POST, "/api/v1/auth/login", Some(&other), None)
        .await;
    assert_error(
        status,
        &body,
        StatusCode::UNAUTHORIZED,
        "invalid_credentials",
    );
}

async fn a_deactivated_admin_stays_deactivated_at_restart(backend: Backend) {
    let mut env = TestEnv::on(backend).await;
    let path = format!("/api/v1/admin/users/{ADMIN_USER}");
    let (status, user) = env
        .call(Method::PATCH, &path, Some(r#"{"active": false}"#))
        .await;
    assert_eq!(status, StatusCode::OK, "{user}");
    env.start_another_api().await;
    let (_, users) = env
        .call(
            Method::GET,
            &format!("/api/v1/admin/users?q={ADMIN_USER}"),
            None,
        )
        .await;
    let root = users["users"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == ADMIN_USER)
        .unwrap_or_else(|| panic!("{users}"));
    assert_eq!(root["active"], false, "{root}");
    let login = json!({ "username": ADMIN_USER, "password": ADMIN_PASSWORD }).to_string();
    let (status, _) = env
        .call_with(Method::POST, "/api/v1/auth/login", Some(&login), None)
        .await;
    assert_ne!(status, StatusCode::OK, "a deactivated admin cannot log in");
}

async fn concurrent_wrong_passwords_are_locked_out_at_the_limit(backend: Backend) {
    // The default limit (5 per account), and enough checking threads that the
    // guesses really run at once.
    let env = TestEnv::on_with(backend, &["--password-checks", "8"]).await;
    let bob = env.user("bob");
    let email = format!("{bob}@example.org");
    let body = json!({ "username": bob, "email": email, "password": PASSWORD }).to_string();
    let (status, created) = env
        .call_with(Method::POST, "/api/v1/auth/register", Some(&body), None)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    // Forty guesses at once, by name and by email: the same account.
    let env = &env;
    let guesses = futures::future::join_all((0..40).map(|i| {
        let login = if i % 2 == 0 {
            bob.clone()
        } else {
            email.clone()
        };
        async move {
            let guess = json!({ "username": login, "password": format!("guess number {i}") });
            env.call_with(
                Method::POST,
                "/api/v1/auth/login",
                Some(&guess.to_string()),
                None,
            )
            .await
            .0
        }
    }))
    .await;
    let checked = guesses
        .iter()
        .filter(|s| **s == StatusCode::UNAUTHORIZED)
        .count();
    let refused = guesses
        .iter()
        .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert_eq!(
        (checked, refused),
        (5, 35),
        "exactly the limit is checked: {guesses:?}"
    );
    // Locked: the right password waits too, by either name.
    for login in [&bob, &email] {
        let right = json!({ "username": login, "password": PASSWORD }).to_string();
        let (status, body) = env
            .call_with(Method::POST, "/api/v1/auth/login", Some(&right), None)
            .await;
        assert_error(
            status,
            &body,
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_requests",
        );
    }
}

async fn wrong_current_passwords_are_throttled_and_audited(backend: Backend) {
    let env = TestEnv::on_with(backend, &["--login-max-failures", "3"]).await;
    let cat = env.user("cat");
    let token = env.register(&cat, PASSWORD).await;
    let change = |current: &str| {
        json!({ "current_password": current, "new_password": "another long password" }).to_string()
    };
    for _ in 0..3 {
        let (status, body) = as_user(
            &env,
            &token,
            Method::POST,
            "/api/v1/auth/password",
            Some(&change("not it")),
        )
        .await;
        assert_error(
            status,
            &body,
            StatusCode::UNAUTHORIZED,
            "invalid_credentials",
        );
    }
    let (status, _) = as_user(
        &env,
        &token,
        Method::POST,
        "/api/v1/auth/password",
        Some(&change(PASSWORD)),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::TOO_MANY_REQUESTS,
        "the right one waits once locked"
    );
    let admin = env.login(ADMIN_USER, ADMIN_PASSWORD).await;
    let (_, audit) = as_user(&env, &admin, Method::GET, "/api/v1/admin/audit", None).await;
    let failed = audit["entries"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["action"] == "password_change_failed" && e["target"] == cat.as_str())
        .count();
    assert_eq!(failed, 3, "{audit}");
}

/// A wrong login from the test (127.0.0.1) that says `X-Forwarded-For: forwarded`.
async fn wrong_login_forwarded_for(env: &TestEnv, user: &str, forwarded: &str) -> StatusCode {
    env.http()
        .post(format!("{}/api/v1/auth/login", env.base))
        .header("content-type", "application/json")
        .header("x-forwarded-for", forwarded)
        .body(json!({ "username": user, "password": "not it" }).to_string())
        .send()
        .await
        .unwrap()
        .status()
}

/// The client addresses of the audit log's failed logins, newest first.
async fn failed_login_addresses(env: &TestEnv, admin: &str) -> Vec<String> {
    let (_, audit) = as_user(env, admin, Method::GET, "/api/v1/admin/audit", None).await;
    audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "login_failed")
        .map(|e| e["client_addr"].as_str().unwrap_or_default().to_owned())
        .collect()
}

async fn forwarded_for_is_believed_only_from_trusted_proxies(backend: Backend) {
    // The test's own address is not a trusted proxy: a rotating X-Forwarded-For
    // does not escape the per-address lock, nor lands in the audit log.
    let env = TestEnv::on_with(
        backend,
        &[
            "--trusted-proxies",
            "10.0.0.0/8",
            "--login-max-failures-per-address",
            "3",
        ],
    )
    .await;
    // Logged in before the lock, from the same address.
    let admin = env.login(ADMIN_USER, ADMIN_PASSWORD).await;
    for i in 0..3 {
        let status =
            wrong_login_forwarded_for(&env, &format!("nobody-{i}"), &format!("6.6.6.{i}")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let status = wrong_login_forwarded_for(&env, "nobody-9", "6.6.6.9").await;
    assert_eq!(
        status,
        StatusCode::TOO_MANY_REQUESTS,
        "one address, however it says it is another"
    );
    assert!(
        failed_login_addresses(&env, &admin)
            .await
            .iter()
            .all(|a| a == "127.0.0.1"),
        "the peer's address is recorded"
    );

    // Behind a trusted proxy (the test is one here): the hop it added is the
    // client; anything that is not an address is not believed.
    let env = TestEnv::on_with(backend, &["--trusted-proxies", "127.0.0.1/32"]).await;
    let admin = env.login(ADMIN_USER, ADMIN_PASSWORD).await;
    wrong_login_forwarded_for(&env, "nobody-1", "6.6.6.6, 198.51.100.7").await;
    let markup = format!("<b>{}</b>", "x".repeat(3000));
    wrong_login_forwarded_for(&env, "nobody-2", &markup).await;
    let recorded = failed_login_addresses(&env, &admin).await;
    assert_eq!(recorded, vec!["127.0.0.1", "198.51.100.7"], "{recorded:?}");
}

async fn registrations_are_throttled_per_address_and_do_not_say_what_is_taken(backend: Backend) {
    let env = TestEnv::on_with(
        backend,
        &[
            "--allow-registration",
            "true",
            "--registrations-per-address",
            "3",
        ],
    )
    .await;
    let register = async |name: &str, email: &str| {
        let body = json!({ "username": name, "email": email, "password": PASSWORD });
        env.call_with(
            Method::POST,
            "/api/v1/auth/register",
            Some(&body.to_string()),
            None,
        )
        .await
    };
    let (ann, bob) = (env.user("ann"), env.user("bob"));
    let (status, _) = register(&ann, "ann@example.org").await;
    assert_eq!(status, StatusCode::CREATED);
    // A taken name and a taken email get the same answer, naming neither.
    let (by_name, name_answer) = register(&ann, "other@example.org").await;
    let (by_email, email_answer) = register(&bob, "ann@example.org").await;
    assert_eq!(
        (by_name, by_email),
        (StatusCode::CONFLICT, StatusCode::CONFLICT)
    );
    assert_eq!(name_answer, email_answer);
    let message = name_answer["message"].as_str().unwrap();
    assert!(
        !message.contains(&ann) && !message.contains("ann@"),
        "{message}"
    );
    // Three registrations (tried) from this address; the fourth waits.
    let (status, body) = register(&env.user("cat"), "cat@example.org").await;
    assert_error(
        status,
        &body,
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_requests",
    );
    let after: i64 = env.count("select count(*) from users").await;
    assert_eq!(after, 2, "the admin and ann");
}

async fn a_newcomer_with_a_deleted_users_name_cannot_read_their_jobs(backend: Backend) {
    let mut env = TestEnv::on(backend).await;
    env.start_worker(&[]);
    let bob = env.user("bob");
    let first = env.register(&bob, PASSWORD).await;
    let server = format!("/api/v1/users/{bob}/server");
    let (status, spawn) = as_user(&env, &first, Method::POST, &server, None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{spawn}");
    let old_job = spawn["job_id"].as_str().unwrap().to_owned();
    env.wait_job(&old_job, Duration::from_secs(60)).await;
    let job_path = format!("/api/v1/jobs/{old_job}");
    let (status, _) = as_user(&env, &first, Method::GET, &job_path, None).await;
    assert_eq!(status, StatusCode::OK, "the first Bob reads his own job");

    // The admin deletes Bob; once he is gone a newcomer takes the name.
    let (status, body) = env
        .call(Method::DELETE, &format!("/api/v1/users/{bob}"), None)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    wait_for("bob's removal", Duration::from_secs(60), async || {
        let (status, _) = env
            .call(Method::GET, &format!("/api/v1/users/{bob}"), None)
            .await;
        status == StatusCode::NOT_FOUND
    })
    .await;
    let newcomer = env.register(&bob, PASSWORD).await;
    let (status, body) = as_user(&env, &newcomer, Method::GET, &job_path, None).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    let (status, job) = env.call(Method::GET, &job_path, None).await;
    assert_eq!(status, StatusCode::OK, "an admin still reads it: {job}");
    assert_eq!(job["user"], bob.as_str(), "{job}");

    // The newcomer's own jobs are theirs.
    let (status, spawn) = as_user(&env, &newcomer, Method::POST, &server, None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{spawn}");
    let new_job = spawn["job_id"].as_str().unwrap();
    let (status, job) = as_user(
        &env,
        &newcomer,
        Method::GET,
        &format!("/api/v1/jobs/{new_job}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{job}");
    env.wait_job(new_job, Duration::from_secs(60)).await;
    let (status, body) = env
        .call(Method::DELETE, &format!("/api/v1/users/{bob}"), None)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    wait_for(
        "the newcomer's removal",
        Duration::from_secs(60),
        async || env.containers().is_empty(),
    )
    .await;
}

/// An admin finds audit entries by actor, action, part of the target and time,
/// through the API and on the dashboard's audit page.
async fn the_audit_log_is_searched_by_actor_action_target_and_time(backend: Backend) {
    let env = TestEnv::on(backend).await;
    let ann = env.user("aud");
    env.register(&ann, "a long enough password").await;
    let wrong = json!({ "username": ann, "password": "not the password" }).to_string();
    for _ in 0..2 {
        let (status, _) = env
            .call_with(Method::POST, "/api/v1/auth/login", Some(&wrong), None)
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let own = env.login(&ann, "a long enough password").await;
    let admin = env.login(ADMIN_USER, ADMIN_PASSWORD).await;
    let search = async |query: &str| {
        let (status, body) = as_user(
            &env,
            &admin,
            Method::GET,
            &format!("/api/v1/admin/audit?{query}"),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{query}: {body}");
        body
    };
    let failed = search(&format!("action=login_failed&target={ann}")).await;
    assert_eq!(failed["total"], 2, "{failed}");
    for entry in failed["entries"].as_array().unwrap() {
        assert_eq!(entry["action"], "login_failed");
        assert_eq!(entry["target"], ann.as_str());
    }
    // Part of the target, and the actor exactly.
    let part = &ann[..ann.len() - 2];
    let theirs = search(&format!("target={part}")).await;
    let actions: Vec<&str> = theirs["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert!(
        actions.contains(&"user_registered")
            && actions.contains(&"login_failed")
            && actions.contains(&"login_succeeded"),
        "{theirs}"
    );
    // Ann acted twice: registering logged her in, then she logged in.
    let by_ann = search(&format!("actor=user:{ann}")).await;
    assert_eq!(by_ann["total"], 2, "{by_ann}");
    for entry in by_ann["entries"].as_array().unwrap() {
        assert_eq!(entry["action"], "login_succeeded");
    }
    // Time: nothing after a minute from now, everything of the last hour.
    let later = (chrono::Utc::now() + chrono::Duration::minutes(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let hour_ago = (chrono::Utc::now() - chrono::Duration::hours(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    assert_eq!(
        search(&format!("target={ann}&since={later}")).await["total"],
        0
    );
    assert_eq!(
        search(&format!("target={ann}&since={hour_ago}&until={later}")).await["total"],
        theirs["total"]
    );
    // Bad searches are 400s that say why.
    for bad in ["since=yesterday", "actor=x&color=red", "per_page=0"] {
        let (status, body) = as_user(
            &env,
            &admin,
            Method::GET,
            &format!("/api/v1/admin/audit?{bad}"),
            None,
        )
        .await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, "bad_request");
    }
    let (status, _) = as_user(&env, &own, Method::GET, "/api/v1/admin/audit", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // The dashboard's audit page, filtered the same way.
    let page = env
        .http()
        .get(format!(
            "{}/admin/audit?action=login_failed&target={ann}",
            env.base
        ))
        .header("cookie", format!("berth_session={admin}"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let html = page.text().await.unwrap();
    assert_eq!(html.matches("<td>login_failed</td>").count(), 2, "{html}");
    assert!(!html.contains("<td>login_succeeded</td>"), "{html}");
    assert!(html.contains("2 in all"), "{html}");
}

on_both_stores!(
    the_audit_log_is_searched_by_actor_action_target_and_time,
    a_newcomer_with_a_deleted_users_name_cannot_read_their_jobs,
    registrations_are_throttled_per_address_and_do_not_say_what_is_taken,
    forwarded_for_is_believed_only_from_trusted_proxies,
    concurrent_wrong_passwords_are_locked_out_at_the_limit,
    wrong_current_passwords_are_throttled_and_audited,
    a_registered_admin_name_is_not_promoted_at_restart,
    a_deactivated_admin_stays_deactivated_at_restart,
    a_users_write_token_cannot_delete_an_admin,
    numbers_and_lengths_out_of_range_get_400_and_write_nothing,
    a_burst_of_logins_waits_for_password_checks_or_gets_503,
    users_register_log_in_act_on_their_own_servers_and_log_out,
    admins_page_users_change_roles_deactivate_and_delete,
    expired_revoked_tampered_unsigned_and_foreign_tokens_get_401,
    service_tokens_carry_scopes_are_shown_once_and_can_be_revoked,
    login_throttling_starts_after_repeated_failures_and_clears,
    fifty_concurrent_registrations_of_one_name_make_one_user,
    bad_registrations_get_clear_errors_and_write_nothing,
    a_user_past_the_per_user_server_limit_gets_429,
    responses_carry_security_headers_and_cors_only_for_configured_origins,
    an_sso_hand_off_is_for_one_server_single_use_and_expires,
    another_servers_attempt_leaves_an_sso_token_unspent,
);
