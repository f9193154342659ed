//! The customer portal and vendor console over real HTTP against a control plane on port 0,
//! on a manual clock: entry links work once and for five minutes, sessions are HttpOnly and
//! SameSite=Strict cookies that expire and can be revoked, forms without the session's CSRF
//! token are refused, a portal session never reaches another account, delegated administration
//! follows the `admin` role, changes are audited with the portal user as the actor, and nobody
//! decides their own access request, whichever way they came in. The real-browser walk-through
//! is `tests/portal_browser.rs`.
#![allow(clippy::disallowed_methods, reason = "waits on real processes and sockets use wall-clock deadlines")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;
mod control_plane_support;

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use common::{Client, Reply};
use control_plane_support::{TestControlPlane, get, post, send_json};
use tollgate_core::clock::ManualClock;
use tollgate_core::period::parse_rfc3339;

/// A control plane on a manual clock, with accounts `acme` (team, 3 seats; alice is an admin,
/// bob a member) and `globex`.
struct Fixture {
    server: TestControlPlane,
    clock: Arc<ManualClock>,
    integration: String,
    admin: String,
    client: Client,
    _dir: tempfile::TempDir,
}

async fn fixture() -> Fixture {
    let start = parse_rfc3339("2030-05-10T12:00:00Z").unwrap();
    let clock = Arc::new(ManualClock::new(start * 1000));
    let dir = tempfile::tempdir().unwrap();
    let configured = Arc::clone(&clock);
    let server = TestControlPlane::start_configured(dir.path(), move |config| config.clock = configured).await;
    let integration = server.key("integration", None);
    let admin = server.key("admin", None);
    let mut client = server.client().await;
    for (order_id, account, plan) in [("o-1", "acme", "team"), ("o-2", "globex", "business")] {
        let order = json!({"order_id": order_id, "action": "new", "account": account, "plan": plan, "seats": 3});
        assert_eq!(post(&mut client, "/v1/orders", &integration, &order).await.status, 200);
    }
    for (account, user, roles) in
        [("acme", "alice", json!(["admin"])), ("acme", "bob", json!(["member"])), ("globex", "gina", json!(["admin"]))]
    {
        let reply =
            send_json(&mut client, "PUT", &format!("/v1/accounts/{account}/users/{user}"), &integration, &json!({"roles": roles})).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    Fixture { server, clock, integration, admin, client, _dir: dir }
}

/// The path and query of a portal link (`http://HOST/portal/enter?token=...`).
fn path_of(url: &str) -> String {
    let start = url.find("/portal/").unwrap();
    url[start..].to_string()
}

fn header(reply: &Reply, name: &str) -> String {
    reply.headers.get(name).map(|value| value.to_str().unwrap().to_string()).unwrap_or_default()
}

/// The `name=value` of a Set-Cookie header of `reply`.
fn cookie(reply: &Reply, name: &str) -> Option<String> {
    reply
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|value| value.to_str().unwrap().to_string())
        .find(|value| value.starts_with(&format!("{name}=")))
}

fn cookie_pair(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap().to_string()
}

/// The value of the first `name="csrf"` hidden field of a page.
fn csrf_of(page: &str) -> String {
    let marker = r#"name="csrf" value=""#;
    let start = page.find(marker).unwrap_or_else(|| panic!("no csrf field in {page}")) + marker.len();
    page[start..].split('"').next().unwrap().to_string()
}

async fn browse(client: &mut Client, path: &str, cookie: &str) -> Reply {
    client.send("GET", path, bytes::Bytes::new(), &[("cookie", cookie)]).await
}

async fn submit(client: &mut Client, path: &str, cookie: &str, form: &str) -> Reply {
    client.send("POST", path, form.to_string(), &[("cookie", cookie), ("content-type", "application/x-www-form-urlencoded")]).await
}

impl Fixture {
    async fn link(&mut self, account: &str, user: &str) -> Value {
        let body = json!({"account": account, "user": user, "return_url": "https://app.example/settings"});
        let reply = post(&mut self.client, "/v1/portal/sessions", &self.integration, &body).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        reply.json()
    }

    /// Follows a fresh link for `user` of `account`; returns the session cookie and the CSRF
    /// token of its overview page.
    async fn enter(&mut self, account: &str, user: &str) -> (String, String) {
        let link = self.link(account, user).await;
        let reply = self.client.get(&path_of(link["url"].as_str().unwrap())).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        let session = cookie_pair(&cookie(&reply, "tg_portal").unwrap());
        let page = browse(&mut self.client, &format!("/portal/accounts/{account}"), &session).await;
        assert_eq!(page.status, 200, "{}", page.text());
        (session, csrf_of(&page.text()))
    }

    async fn account(&mut self, account: &str) -> Value {
        get(&mut self.client, &format!("/v1/accounts/{account}"), &self.admin).await.json()["state"].clone()
    }

    /// Signs in to the console as `person` with the admin key; returns the cookie and token.
    async fn console(&mut self, person: &str) -> (String, String) {
        let form = self.client.get("/console").await;
        assert_eq!(form.status, 200, "{}", form.text());
        let signin_cookie = cookie_pair(&cookie(&form, "tg_console_signin").unwrap());
        let token = csrf_of(&form.text());
        let body = format!("csrf={token}&person={person}&key={}", self.admin);
        let reply = submit(&mut self.client, "/console/signin", &signin_cookie, &body).await;
        assert_eq!(reply.status, 303, "{}", reply.text());
        let session = cookie_pair(&cookie(&reply, "tg_console").unwrap());
        let page = browse(&mut self.client, "/console/accounts", &session).await;
        assert_eq!(page.status, 200, "{}", page.text());
        (session, csrf_of(&page.text()))
    }
}

#[tokio::test]
async fn a_link_works_once_and_only_for_five_minutes() {
    let mut fixture = fixture().await;
    let link = fixture.link("acme", "alice").await;
    assert_eq!(link["expires_at"], "2030-05-10T12:05:00Z");
    let url = link["url"].as_str().unwrap();
    assert!(url.starts_with(&format!("http://{}/portal/enter?token=", fixture.server.addr)), "{url}");

    // A link checker's HEAD does not spend it.
    assert_eq!(fixture.client.send("HEAD", &path_of(url), bytes::Bytes::new(), &[]).await.status, 200);
    let first = fixture.client.get(&path_of(url)).await;
    assert_eq!(first.status, 200, "{}", first.text());
    let set_cookie = cookie(&first, "tg_portal").unwrap();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/portal", "Max-Age=3600"] {
        assert!(set_cookie.contains(attribute), "{set_cookie}");
    }
    // No TLS configured here: the cookie is not marked Secure (see the unit test of `public_url`).
    assert!(!set_cookie.contains("Secure"), "{set_cookie}");
    assert_eq!(header(&first, "content-security-policy").split(';').next(), Some("default-src 'self'"));
    assert_eq!(header(&first, "x-frame-options"), "DENY");
    assert_eq!(header(&first, "referrer-policy"), "no-referrer");

    let again = fixture.client.get(&path_of(url)).await;
    assert_eq!(again.status, 410);
    assert!(again.text().contains("This link has already been used"), "{}", again.text());
    assert!(cookie(&again, "tg_portal").is_none());

    let late = fixture.link("acme", "alice").await;
    fixture.clock.advance(Duration::from_secs(5 * 60));
    let reply = fixture.client.get(&path_of(late["url"].as_str().unwrap())).await;
    assert_eq!(reply.status, 410);
    assert!(reply.text().contains("This link has expired"), "{}", reply.text());

    let forged = fixture.client.get("/portal/enter?token=0000").await;
    assert_eq!(forged.status, 404);
    assert!(forged.text().contains("This link is not valid"));
}

#[tokio::test]
async fn links_are_made_only_for_users_of_the_account_with_a_managing_key() {
    let mut fixture = fixture().await;
    let customer = fixture.server.key("account", Some("acme"));
    let sidecar = fixture.server.key("sidecar", None);
    let body = json!({"account": "acme", "user": "alice"});
    assert_eq!(post(&mut fixture.client, "/v1/portal/sessions", &customer, &body).await.status, 403);
    assert_eq!(post(&mut fixture.client, "/v1/portal/sessions", &sidecar, &body).await.status, 403);
    assert_eq!(post(&mut fixture.client, "/v1/portal/sessions", "tg_nope", &body).await.status, 401);
    let stranger =
        post(&mut fixture.client, "/v1/portal/sessions", &fixture.integration, &json!({"account": "acme", "user": "mallory"})).await;
    assert_eq!(stranger.status, 404);
    assert!(stranger.text().contains("unknown user `mallory`"), "{}", stranger.text());
    let script = json!({"account": "acme", "user": "alice", "return_url": "javascript:alert(1)"});
    let reply = post(&mut fixture.client, "/v1/portal/sessions", &fixture.integration, &script).await;
    assert_eq!(reply.status, 400);
    assert!(reply.text().contains("`return_url`"), "{}", reply.text());
    let extra = json!({"account": "acme", "user": "alice", "admin": true});
    assert_eq!(post(&mut fixture.client, "/v1/portal/sessions", &fixture.integration, &extra).await.status, 400);
}

#[tokio::test]
async fn a_portal_session_never_reaches_another_account() {
    let mut fixture = fixture().await;
    let (session, csrf) = fixture.enter("acme", "alice").await;
    for page in ["", "/features", "/usage", "/users", "/devices", "/requests", "/token"] {
        let own = browse(&mut fixture.client, &format!("/portal/accounts/acme{page}"), &session).await;
        assert_eq!(own.status, 200, "{page}: {}", own.text());
        let other = browse(&mut fixture.client, &format!("/portal/accounts/globex{page}"), &session).await;
        assert_eq!(other.status, 403, "{page}");
        assert!(other.text().contains("belongs to another account"), "{}", other.text());
        assert!(!other.text().contains("gina"));
    }
    // Nor through a form, with a token that is valid for its own account.
    let reply = submit(&mut fixture.client, "/portal/accounts/globex/users", &session, &format!("csrf={csrf}&user=eve&roles=admin")).await;
    assert_eq!(reply.status, 403);
    assert!(!fixture.account("globex").await["users"].as_object().unwrap().contains_key("eve"));
    // And with no session at all, nothing is shown.
    let anonymous = fixture.client.get("/portal/accounts/acme").await;
    assert_eq!(anonymous.status, 401);
    assert!(!anonymous.text().contains("alice"));
}

#[tokio::test]
async fn forms_need_the_session_token_and_changes_are_audited_as_the_portal_user() {
    let mut fixture = fixture().await;
    let (session, csrf) = fixture.enter("acme", "alice").await;
    let path = "/portal/accounts/acme/users";
    for form in ["user=carol&roles=member&seat=on".to_string(), "csrf=&user=carol&seat=on".to_string(), format!("csrf={csrf}x&user=carol")]
    {
        let refused = submit(&mut fixture.client, path, &session, &form).await;
        assert_eq!(refused.status, 403, "{form}");
        assert!(refused.text().contains("security token"), "{}", refused.text());
    }
    assert!(!fixture.account("acme").await["users"].as_object().unwrap().contains_key("carol"));

    let saved = submit(&mut fixture.client, path, &session, &format!("csrf={csrf}&user=carol&roles=member&roles=viewer&seat=on")).await;
    assert_eq!(saved.status, 303, "{}", saved.text());
    assert_eq!(header(&saved, "location"), "/portal/accounts/acme/users?done=user_saved");
    let carol = fixture.account("acme").await["users"]["carol"].clone();
    assert_eq!(carol, json!({"roles": ["member", "viewer"], "groups": [], "seat": true}));
    let page = browse(&mut fixture.client, "/portal/accounts/acme/users?done=user_saved", &session).await.text();
    assert!(page.contains("3 of 3"), "{page}");

    // The seat cap holds, and the page says why.
    let over = submit(&mut fixture.client, path, &session, &format!("csrf={csrf}&user=dave&seat=on")).await;
    assert_eq!(over.status, 422);
    assert!(over.text().contains("all 3 seats of the account are taken"), "{}", over.text());
    let seatless = submit(&mut fixture.client, path, &session, &format!("csrf={csrf}&user=dave")).await;
    assert_eq!(seatless.status, 303, "{}", seatless.text());

    let removed = submit(&mut fixture.client, "/portal/accounts/acme/users/dave/remove", &session, &format!("csrf={csrf}")).await;
    assert_eq!(removed.status, 303, "{}", removed.text());

    let entries = get(&mut fixture.client, "/v1/audit?account=acme", &fixture.admin).await.json()["entries"].clone();
    let by_portal: Vec<(&str, &str)> = entries
        .as_array()
        .unwrap()
        .iter()
        .filter(|entry| entry["key_id"].as_str().unwrap().starts_with("portal/"))
        .map(|entry| (entry["action"].as_str().unwrap(), entry["target"].as_str().unwrap()))
        .collect();
    assert_eq!(by_portal, vec![("user.put", "carol"), ("user.put", "dave"), ("user.delete", "dave")]);
    assert!(
        entries
            .as_array()
            .unwrap()
            .iter()
            .filter(|entry| entry["action"] == "user.put" && entry["target"] != "alice" && entry["target"] != "bob")
            .all(|entry| entry["key_id"] == "portal/acme/alice")
    );
}

#[tokio::test]
async fn only_admins_of_the_account_manage_its_users_and_devices() {
    let mut fixture = fixture().await;
    let device = post(&mut fixture.client, "/v1/accounts/acme/devices", &fixture.integration, &json!({"device": "laptop-1"})).await;
    assert_eq!(device.status, 200, "{}", device.text());
    let (session, csrf) = fixture.enter("acme", "bob").await;
    let page = browse(&mut fixture.client, "/portal/accounts/acme/users", &session).await.text();
    assert!(page.contains("needs the <b>admin</b> role"), "{page}");
    assert!(!page.contains("id=\"add-user\""));
    let refused = submit(&mut fixture.client, "/portal/accounts/acme/users", &session, &format!("csrf={csrf}&user=eve&seat=on")).await;
    assert_eq!(refused.status, 403);
    let refused = submit(&mut fixture.client, "/portal/accounts/acme/devices/laptop-1/deactivate", &session, &format!("csrf={csrf}")).await;
    assert_eq!(refused.status, 403);
    assert_eq!(fixture.account("acme").await["devices"], json!(["laptop-1"]));

    // Everyone may ask for access.
    let asked = submit(
        &mut fixture.client,
        "/portal/accounts/acme/requests",
        &session,
        &format!("csrf={csrf}&what=feature%3Asso&reason=SAML+for+our+team"),
    )
    .await;
    assert_eq!(asked.status, 303, "{}", asked.text());
    let requests = get(&mut fixture.client, "/v1/access-requests?account=acme", &fixture.admin).await.json();
    assert_eq!(requests["access_requests"][0]["user"], "bob");
    assert_eq!(requests["access_requests"][0]["requested_by"], "portal/acme/bob");

    let (admin_session, admin_csrf) = fixture.enter("acme", "alice").await;
    let done =
        submit(&mut fixture.client, "/portal/accounts/acme/devices/laptop-1/deactivate", &admin_session, &format!("csrf={admin_csrf}"))
            .await;
    assert_eq!(done.status, 303, "{}", done.text());
    assert_eq!(fixture.account("acme").await["devices"], json!([]));
}

#[tokio::test]
async fn sessions_expire_and_can_be_revoked() {
    let mut fixture = fixture().await;
    let (session, csrf) = fixture.enter("acme", "alice").await;
    let signed_out = submit(&mut fixture.client, "/portal/signout", &session, &format!("csrf={csrf}")).await;
    assert_eq!(signed_out.status, 200, "{}", signed_out.text());
    assert!(cookie(&signed_out, "tg_portal").unwrap().contains("Max-Age=0"));
    assert_eq!(browse(&mut fixture.client, "/portal/accounts/acme", &session).await.status, 401);

    // The console revokes every portal session of an account.
    let (first, _) = fixture.enter("acme", "alice").await;
    let (second, _) = fixture.enter("acme", "bob").await;
    let (other, _) = fixture.enter("globex", "gina").await;
    let (console, console_csrf) = fixture.console("carol@vendor.example").await;
    let account_page = browse(&mut fixture.client, "/console/accounts/acme", &console).await.text();
    assert!(account_page.contains("Portal sessions<b>2</b>"), "{account_page}");
    let revoked = submit(&mut fixture.client, "/console/accounts/acme/revoke-sessions", &console, &format!("csrf={console_csrf}")).await;
    assert_eq!(revoked.status, 303, "{}", revoked.text());
    assert_eq!(browse(&mut fixture.client, "/portal/accounts/acme", &first).await.status, 401);
    assert_eq!(browse(&mut fixture.client, "/portal/accounts/acme", &second).await.status, 401);
    assert_eq!(browse(&mut fixture.client, "/portal/accounts/globex", &other).await.status, 200);
    let entries = get(&mut fixture.client, "/v1/audit?account=acme", &fixture.admin).await.json()["entries"].clone();
    let revocation = entries.as_array().unwrap().iter().find(|entry| entry["action"] == "portal.sessions_revoke").unwrap();
    assert!(revocation["key_id"].as_str().unwrap().ends_with("/carol@vendor.example"), "{revocation}");
    assert_eq!(revocation["after"], json!({"revoked": 2}));

    // An hour later the session has expired by itself.
    fixture.clock.advance(Duration::from_secs(3_600));
    let expired = browse(&mut fixture.client, "/portal/accounts/globex", &other).await;
    assert_eq!(expired.status, 401);
    assert!(expired.text().contains("session has ended"), "{}", expired.text());

    // A console session ends when its admin key is revoked.
    let key_id = fixture.admin.split('_').nth(1).unwrap().to_string();
    let other_admin = fixture.server.key("admin", None);
    assert_eq!(send_json(&mut fixture.client, "DELETE", &format!("/v1/keys/{key_id}"), &other_admin, &json!({})).await.status, 200);
    assert_eq!(browse(&mut fixture.client, "/console/accounts", &console).await.status, 401);
}

#[tokio::test]
async fn the_console_needs_an_admin_key_and_nobody_decides_their_own_request() {
    let mut fixture = fixture().await;
    // Sign-in refuses other scopes and a post without the form's token.
    let form = fixture.client.get("/console").await;
    let signin_cookie = cookie_pair(&cookie(&form, "tg_console_signin").unwrap());
    let token = csrf_of(&form.text());
    let integration = format!("csrf={token}&person=carol&key={}", fixture.integration);
    let refused = submit(&mut fixture.client, "/console/signin", &signin_cookie, &integration).await;
    assert_eq!(refused.status, 401);
    assert!(refused.text().contains("needs an admin key"), "{}", refused.text());
    let forged = submit(&mut fixture.client, "/console/signin", "", &format!("csrf={token}&person=carol&key={}", fixture.admin)).await;
    assert_eq!(forged.status, 403);
    assert_eq!(fixture.client.get("/console/accounts").await.status, 401);

    let (portal, portal_csrf) = fixture.enter("acme", "alice").await;
    let asked = submit(
        &mut fixture.client,
        "/portal/accounts/acme/requests",
        &portal,
        &format!("csrf={portal_csrf}&what=feature%3Asso&reason=pilot"),
    )
    .await;
    assert_eq!(asked.status, 303, "{}", asked.text());
    let id = get(&mut fixture.client, "/v1/access-requests?account=acme", &fixture.admin).await.json()["access_requests"][0]["id"]
        .as_i64()
        .unwrap();

    // Alice also works for the vendor: in the console she still cannot approve her own request.
    let (alice, alice_csrf) = fixture.console("alice").await;
    let queue = browse(&mut fixture.client, "/console/requests", &alice).await.text();
    assert!(queue.contains(&format!("id=\"request-{id}\"")), "{queue}");
    let own = submit(
        &mut fixture.client,
        &format!("/console/requests/{id}/decide"),
        &alice,
        &format!("csrf={alice_csrf}&decision=approve&comment=mine"),
    )
    .await;
    assert_eq!(own.status, 403);
    assert!(own.text().contains("cannot decide their own access request"), "{}", own.text());
    let no_token = submit(&mut fixture.client, &format!("/console/requests/{id}/decide"), &alice, "decision=approve&comment=x").await;
    assert_eq!(no_token.status, 403);

    let (carol, carol_csrf) = fixture.console("carol").await;
    let approved = submit(
        &mut fixture.client,
        &format!("/console/requests/{id}/decide"),
        &carol,
        &format!("csrf={carol_csrf}&decision=approve&comment=ok+for+the+pilot"),
    )
    .await;
    assert_eq!(approved.status, 303, "{}", approved.text());
    let decided = get(&mut fixture.client, &format!("/v1/access-requests/{id}"), &fixture.admin).await.json();
    assert_eq!(
        (decided["status"].as_str(), decided["decided_by"].as_str()),
        (Some("approved"), Some(format!("console/{}/carol", fixture.admin.split('_').nth(1).unwrap()).as_str()))
    );
    let features = browse(&mut fixture.client, "/portal/accounts/acme/features", &portal).await.text();
    let sso = &features[features.find("id=\"feature-sso\"").unwrap()..];
    assert!(sso[..sso.find("</tr>").unwrap()].contains("allowed"), "{sso}");
}

#[tokio::test]
async fn console_pages_answer_and_search_by_prefix() {
    let mut fixture = fixture().await;
    let (console, _) = fixture.console("carol").await;
    let found = browse(&mut fixture.client, "/console/accounts?q=ac", &console).await.text();
    assert!(found.contains("/console/accounts/acme") && !found.contains("/console/accounts/globex"), "{found}");
    let account = browse(&mut fixture.client, "/console/accounts/acme", &console).await.text();
    assert!(account.contains("order.new") && account.contains("o-1"), "{account}");
    for page in ["/console/requests", "/console/analytics", "/console/export", "/console/webhooks", "/console/webhooks?status=failed"] {
        let reply = browse(&mut fixture.client, page, &console).await;
        assert_eq!(reply.status, 200, "{page}: {}", reply.text());
        assert_eq!(header(&reply, "content-security-policy").split(';').next(), Some("default-src 'self'"));
    }
    let csv = browse(&mut fixture.client, "/console/export.csv?from=2030-05-01T00:00:00Z&to=2030-06-01T00:00:00Z", &console).await;
    assert_eq!(csv.status, 200);
    assert!(header(&csv, "content-type").starts_with("text/csv"), "{}", header(&csv, "content-type"));
    let bad = browse(&mut fixture.client, "/console/analytics?from=yesterday", &console).await;
    assert_eq!(bad.status, 400);
    assert_eq!(browse(&mut fixture.client, "/console/accounts/nobody", &console).await.status, 404);
    // The assets come from here.
    let css = fixture.client.get("/portal/assets/portal.css").await;
    assert_eq!(css.status, 200);
    assert!(header(&css, "content-type").starts_with("text/css"));
    assert_eq!(fixture.client.get("/portal/assets/../../etc/passwd").await.status, 404);
}
