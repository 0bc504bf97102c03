"""A real OpenID Connect provider for Berth's tests: django-oauth-toolkit with
OIDC on, its users and clients given as JSON, served on 127.0.0.1.

    python provider.py --port 8123 --data /tmp/idp --setup setup.json

setup.json: {"users": [{"username", "password", "email", "groups": [...],
                        "email_verified": true (the default) or false}],
             "clients": [{"client_id", "client_secret", "redirect_uris": [...]}]}

The issuer is http://127.0.0.1:<port>/o (discovery at
/o/.well-known/openid-configuration). ID tokens carry email, email_verified,
preferred_username and groups (the user's Django groups). The RSA signing key is
made at each start, so tokens of one run are not valid at another.
"""

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data", required=True, help="a directory for its database")
    parser.add_argument("--setup", required=True, help="users and clients, as JSON")
    args = parser.parse_args()

    os.makedirs(args.data, exist_ok=True)
    os.environ["BERTH_IDP_DB"] = os.path.join(args.data, "idp.sqlite3")
    sys.path.insert(0, HERE)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "idp.settings")

    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0, interactive=False)

    from django.contrib.auth.models import Group, User
    from oauth2_provider.models import Application

    with open(args.setup) as f:
        setup = json.load(f)
    # Users whose address the provider does not vouch for (email_verified: false).
    os.environ["BERTH_IDP_UNVERIFIED"] = json.dumps(
        [u["username"] for u in setup.get("users", []) if u.get("email_verified") is False]
    )
    for u in setup.get("users", []):
        user = User.objects.create_user(u["username"], u.get("email", ""), u["password"])
        for name in u.get("groups", []):
            group, _ = Group.objects.get_or_create(name=name)
            user.groups.add(group)
    for c in setup.get("clients", []):
        Application.objects.create(
            name=c["client_id"],
            client_id=c["client_id"],
            client_secret=c["client_secret"],
            client_type=Application.CLIENT_CONFIDENTIAL,
            authorization_grant_type=Application.GRANT_AUTHORIZATION_CODE,
            redirect_uris=" ".join(c["redirect_uris"]),
            algorithm=Application.RS256_ALGORITHM,
            skip_authorization=True,
        )
    call_command("runserver", f"127.0.0.1:{args.port}", use_reloader=False, verbosity=0)


if __name__ == "__main__":
    main()
