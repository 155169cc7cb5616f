/* Kestrel's Mosquitto 2.0 auth plugin (plugin API v5): EMQX 5.8 HTTP-authentication semantics.
 *
 * BASIC_AUTH posts the body EMQX would send to authsvc (broker-auth-contract.md §1, §4, ADR-0010) and
 * keeps the answer per connection (keyed by the `struct mosquitto *`, never by client id: on a session
 * takeover the new connection authenticates before the old one disconnects). ACL checks are decided
 * locally from the returned rules; no HTTP call happens after CONNECT. TICK disconnects sessions whose
 * `expire_at` has passed; `$CONTROL/kestrel/v1` lets a principal allowed to publish there kick clients.
 *
 * Options (plugin_opt_*): authn_url (required), broker_key_file (required; the x-authsvc-key),
 * timeout_ms (1500), no_match (deny|allow, default deny), will_grace_s (3600), node (mosquitto),
 * require_subscriptions (space-separated filters; none by default).
 *
 * Transient refusals (ADR-0004, ADR-0010): when authsvc cannot decide (unreachable, or any answer but 200/204) the
 * connect is closed without a CONNACK, which devices treat as a network failure and retry; only a definitive deny
 * is CONNACK "not authorized" (Mosquitto 2.0 sends no other CONNACK code for a plugin's refusal).
 *
 * The subscription gate (require_subscriptions): after a restart Mosquitto 2.0 restores persistent sessions but
 * not their $share subscriptions, so a device publishing before the backends resubscribe gets PUBACK 0x10 (no
 * matching subscribers) and its message is dropped although it counts as received. Until every required filter has
 * been subscribed (an allowed SUBSCRIBE, with or without $share/{group}/) since this broker started, devices (client
 * ids without ':') are refused transiently; backend principals (svc:...) and provisioning clients (prov:...) are not.
 * A subscription of an offline persistent session stays while the broker runs, so the gate opens once per start.
 *
 * Client events (ADR-0013): every admitted connection and its end are published, QoS 1, on the topics and in
 * the shape EMQX uses for `sys_event_messages`: `$SYS/brokers/{node}/clients/{clientid}/connected` and
 * `.../disconnected`, with `connected_at` (ms) identifying the connection in both, so a consumer can tell a
 * session takeover (new connected, then old disconnected) from a device going away.
 *
 * The start marker (issue 12): a crashed broker sends no disconnected events, so after each start the plugin
 * publishes, retained at QoS 1, `$SYS/brokers/{node}/started` with `{"node", "started_at"}` (ms). A consumer closes
 * the connections of that node that began before started_at. Retained, so a consumer that subscribes after the
 * start (or whose persistent session did not survive a crash) still learns of it.
 *
 * A session's rules outlive its DISCONNECT event for will_grace_s: Mosquitto fires DISCONNECT before it
 * sends the client's will (and a delayed will even later), and the will is authorized as a publish by that
 * same connection. A new connection never sees stale rules: BASIC_AUTH replaces them first.
 */
#include <cjson/cJSON.h>
#include <curl/curl.h>
#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/x509.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

#include "acl.h"

#define CONTROL_TOPIC "$CONTROL/kestrel/v1"
#define MAX_REQUIRED 16
#define MAX_RESPONSE (256 * 1024)
#define TABLE_BITS 12

struct session {
	struct session *next;
	const struct mosquitto *client; /* identity only; never dereferenced after DISCONNECT */
	char *clientid;
	char *username; /* NULL when the client sent none */
	bool superuser;
	bool revoked;   /* kicked by $CONTROL: every check denies until the socket closes */
	bool kicked;
	time_t expire_at; /* 0 = none */
	time_t disconnected_at; /* 0 = connected */
	long long connected_ms; /* wall clock ms at admission: the connection's identity in client events */
	struct kacl acl;
};

static struct {
	mosquitto_plugin_id_t *id;
	char *authn_url;
	char *broker_key;
	long timeout_ms;
	bool no_match_allow;
	long will_grace_s;
	char *node;
	CURL *curl;
	struct curl_slist *headers;
	struct session *table[1u << TABLE_BITS];
	size_t sessions;
	time_t last_sweep;
	char *required[MAX_REQUIRED]; /* the subscription gate's filters */
	bool required_seen[MAX_REQUIRED];
	size_t required_count;
	bool gate_open;
	time_t gate_logged_at;
	long long started_ms;
	bool start_announced;
} g;

/* ------------------------------------------------------------------------------ session table */

static unsigned slot(const struct mosquitto *client)
{
	uintptr_t v = (uintptr_t)client;
	v ^= v >> 17;
	v *= 0x9E3779B97F4A7C15ull;
	return (unsigned)(v >> (64 - TABLE_BITS));
}

static struct session *session_get(const struct mosquitto *client)
{
	for(struct session *s = g.table[slot(client)]; s; s = s->next){
		if(s->client == client) return s;
	}
	return NULL;
}

static void session_free(struct session *s)
{
	kacl_free(&s->acl);
	free(s->clientid);
	free(s->username);
	free(s);
}

static void session_remove(const struct mosquitto *client)
{
	struct session **pp = &g.table[slot(client)];
	while(*pp){
		if((*pp)->client == client){
			struct session *dead = *pp;
			*pp = dead->next;
			session_free(dead);
			g.sessions--;
			return;
		}
		pp = &(*pp)->next;
	}
}

static void session_put(struct session *s)
{
	session_remove(s->client);
	unsigned i = slot(s->client);
	s->next = g.table[i];
	g.table[i] = s;
	g.sessions++;
}

/* ------------------------------------------------------------------------------ request body */

static char *base64_der(X509 *cert)
{
	unsigned char *der = NULL;
	int len = i2d_X509(cert, &der);
	if(len <= 0) return NULL;
	char *out = malloc((size_t)(4 * ((len + 2) / 3) + 1));
	if(out) EVP_EncodeBlock((unsigned char *)out, der, len);
	OPENSSL_free(der);
	return out;
}

static char *subject_rfc2253(X509 *cert)
{
	BIO *bio = BIO_new(BIO_s_mem());
	if(!bio) return NULL;
	X509_NAME_print_ex(bio, X509_get_subject_name(cert), 0, XN_FLAG_RFC2253);
	char *data;
	long len = BIO_get_mem_data(bio, &data);
	char *out = malloc((size_t)len + 1);
	if(out){
		memcpy(out, data, (size_t)len);
		out[len] = '\0';
	}
	BIO_free(bio);
	return out;
}

static char *first_common_name(X509 *cert)
{
	X509_NAME *name = X509_get_subject_name(cert);
	int idx = X509_NAME_get_index_by_NID(name, NID_commonName, -1);
	if(idx < 0) return NULL;
	ASN1_STRING *data = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(name, idx));
	unsigned char *utf8 = NULL;
	int len = ASN1_STRING_to_UTF8(&utf8, data);
	if(len < 0) return NULL;
	char *out = strndup((const char *)utf8, (size_t)len);
	OPENSSL_free(utf8);
	return out;
}

/* EMQX renders absent values as "" (never null). */
static void add_str(cJSON *obj, const char *key, const char *value)
{
	cJSON_AddStringToObject(obj, key, value ? value : "");
}

static char *authn_body(struct mosquitto *client, const char *username, const char *password)
{
	cJSON *body = cJSON_CreateObject();
	if(!body) return NULL;
	const char *peer = mosquitto_client_address(client);
	if(peer && !strncmp(peer, "::ffff:", 7)) peer += 7;
	add_str(body, "broker", "mosquitto");
	add_str(body, "clientid", mosquitto_client_id(client));
	add_str(body, "username", username);
	add_str(body, "password", password);
	add_str(body, "peerhost", peer);
	X509 *cert = mosquitto_client_certificate(client);
	char *subject = NULL, *cn = NULL, *pem = NULL;
	if(cert){
		subject = subject_rfc2253(cert);
		cn = first_common_name(cert);
		pem = base64_der(cert);
		X509_free(cert);
	}
	add_str(body, "cert_subject", subject);
	add_str(body, "cert_common_name", cn);
	add_str(body, "cert_pem", pem);
	free(subject);
	free(cn);
	free(pem);
	char *text = cJSON_PrintUnformatted(body);
	cJSON_Delete(body);
	return text;
}

/* ------------------------------------------------------------------------------ HTTP */

struct buffer {
	char *data;
	size_t len;
	bool overflow;
};

static size_t on_body(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	struct buffer *b = userdata;
	size_t n = size * nmemb;
	if(b->len + n > MAX_RESPONSE){
		b->overflow = true;
		return 0;
	}
	char *grown = realloc(b->data, b->len + n + 1);
	if(!grown) return 0;
	b->data = grown;
	memcpy(b->data + b->len, ptr, n);
	b->len += n;
	b->data[b->len] = '\0';
	return n;
}

/* POST the body; returns the HTTP status (0 on transport failure) and the response in *out. */
static long post(const char *body, struct buffer *out, char *content_type, size_t ct_len)
{
	curl_easy_setopt(g.curl, CURLOPT_URL, g.authn_url);
	curl_easy_setopt(g.curl, CURLOPT_HTTPHEADER, g.headers);
	curl_easy_setopt(g.curl, CURLOPT_POSTFIELDS, body);
	curl_easy_setopt(g.curl, CURLOPT_WRITEFUNCTION, on_body);
	curl_easy_setopt(g.curl, CURLOPT_WRITEDATA, out);
	curl_easy_setopt(g.curl, CURLOPT_TIMEOUT_MS, g.timeout_ms);
	curl_easy_setopt(g.curl, CURLOPT_CONNECTTIMEOUT_MS, g.timeout_ms);
	curl_easy_setopt(g.curl, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(g.curl, CURLOPT_FOLLOWLOCATION, 0L);
	CURLcode rc = curl_easy_perform(g.curl);
	if(rc != CURLE_OK){
		mosquitto_log_printf(MOSQ_LOG_WARNING, "kestrel-auth: authsvc unreachable: %s", curl_easy_strerror(rc));
		return 0;
	}
	long status = 0;
	char *ct = NULL;
	curl_easy_getinfo(g.curl, CURLINFO_RESPONSE_CODE, &status);
	curl_easy_getinfo(g.curl, CURLINFO_CONTENT_TYPE, &ct);
	snprintf(content_type, ct_len, "%s", ct ? ct : "");
	return status;
}

/* ------------------------------------------------------------------------------ subscription gate */

static void gate_check_open(void)
{
	for(size_t i = 0; i < g.required_count; i++){
		if(!g.required_seen[i]) return;
	}
	g.gate_open = true;
	mosquitto_log_printf(MOSQ_LOG_NOTICE, "kestrel-auth: every required subscription exists; admitting devices");
}

/* An allowed SUBSCRIBE of `filter` (without $share/{group}/) happened. */
static void gate_note_subscription(const char *filter)
{
	if(g.gate_open) return;
	for(size_t i = 0; i < g.required_count; i++){
		if(!g.required_seen[i] && !strcmp(g.required[i], filter)){
			g.required_seen[i] = true;
			gate_check_open();
			return;
		}
	}
}

/* True when this client must wait: a device (no ':' in its client id) while the gate is closed. */
static bool gate_refuses(const char *clientid)
{
	if(g.gate_open || strchr(clientid, ':') != NULL) return false;
	time_t now = time(NULL);
	if(now != g.gate_logged_at){
		g.gate_logged_at = now;
		mosquitto_log_printf(MOSQ_LOG_NOTICE,
				"kestrel-auth: devices wait until the backends have subscribed (refused %s for now)", clientid);
	}
	return true;
}

static int parse_required(const char *value)
{
	char *copy = strdup(value);
	if(copy == NULL) return -1;
	char *save = NULL;
	for(char *tok = strtok_r(copy, " ,", &save); tok; tok = strtok_r(NULL, " ,", &save)){
		if(g.required_count == MAX_REQUIRED || (g.required[g.required_count] = strdup(tok)) == NULL){
			free(copy);
			return -1;
		}
		g.required_count++;
	}
	free(copy);
	return 0;
}

/* ------------------------------------------------------------------------------ callbacks */

static bool bad_identifier(const char *s)
{
	return s && strpbrk(s, "+#/") != NULL;
}

/* Validate a 200 answer the way EMQX does; fill the session on allow. Returns a MOSQ_ERR_*. */
static int apply_answer(const char *json, struct mosquitto *client, struct session *s)
{
	cJSON *root = cJSON_Parse(json);
	int rc = MOSQ_ERR_PLUGIN_DEFER; /* unparseable or "ignore": next authenticator (none: deny) */
	const char *why = NULL;
	if(!cJSON_IsObject(root)) goto done;
	const cJSON *result = cJSON_GetObjectItemCaseSensitive(root, "result");
	if(!cJSON_IsString(result)) goto done;
	if(!strcmp(result->valuestring, "deny")){
		rc = MOSQ_ERR_AUTH;
		goto done;
	}
	if(strcmp(result->valuestring, "allow")) goto done;
	rc = MOSQ_ERR_AUTH; /* from here on, anything invalid rejects the connect */
	const cJSON *su = cJSON_GetObjectItemCaseSensitive(root, "is_superuser");
	s->superuser = cJSON_IsTrue(su) || (cJSON_IsNumber(su) && su->valuedouble >= 1)
		|| (cJSON_IsString(su) && (!strcmp(su->valuestring, "true") || !strcmp(su->valuestring, "1")));
	const cJSON *exp = cJSON_GetObjectItemCaseSensitive(root, "expire_at");
	if(exp){
		time_t now = time(NULL);
		if(!cJSON_IsNumber(exp) || exp->valuedouble != (double)(long long)exp->valuedouble
				|| exp->valuedouble <= (double)now || exp->valuedouble > (double)now * 500.0){
			why = "expire_at is not a future time in seconds";
			goto done;
		}
		s->expire_at = (time_t)exp->valuedouble;
	}
	if(kacl_parse(cJSON_GetObjectItemCaseSensitive(root, "acl"), &s->acl, &why)) goto done;
	rc = MOSQ_ERR_SUCCESS;
done:
	if(why){
		mosquitto_log_printf(MOSQ_LOG_WARNING, "kestrel-auth: invalid answer for %s: %s",
				mosquitto_client_id(client), why);
	}
	cJSON_Delete(root);
	return rc;
}

static long long now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Publish an EMQX-shaped client event; the broker takes ownership of the payload. */
static void publish_client_event(struct mosquitto *client, const struct session *s, const char *what, int reason)
{
	cJSON *ev = cJSON_CreateObject();
	if(ev == NULL) return;
	add_str(ev, "clientid", s->clientid);
	add_str(ev, "username", s->username);
	add_str(ev, "node", g.node);
	cJSON_AddNumberToObject(ev, "connected_at", (double)s->connected_ms);
	cJSON_AddNumberToObject(ev, "ts", (double)now_ms());
	if(client){
		add_str(ev, "ipaddress", mosquitto_client_address(client));
		cJSON_AddNumberToObject(ev, "proto_ver", mosquitto_client_protocol_version(client));
	}
	if(reason >= 0) add_str(ev, "reason", reason == MOSQ_ERR_SUCCESS ? "normal" : mosquitto_strerror(reason));
	char *payload = cJSON_PrintUnformatted(ev);
	cJSON_Delete(ev);
	if(payload == NULL) return;
	char topic[512];
	int n = snprintf(topic, sizeof(topic), "$SYS/brokers/%s/clients/%s/%s", g.node, s->clientid, what);
	if(n <= 0 || (size_t)n >= sizeof(topic)
			|| mosquitto_broker_publish(NULL, topic, (int)strlen(payload), payload, 1, false, NULL) != MOSQ_ERR_SUCCESS){
		mosquitto_log_printf(MOSQ_LOG_WARNING, "kestrel-auth: could not publish the %s event of %s", what, s->clientid);
		/* mosquitto_broker_publish frees the payload itself on failure after taking it */
	}
}

/* The start marker, retained; retried on every tick until the broker takes it. */
static void announce_start(void)
{
	cJSON *ev = cJSON_CreateObject();
	if(ev == NULL) return;
	add_str(ev, "node", g.node);
	cJSON_AddNumberToObject(ev, "started_at", (double)g.started_ms);
	char *payload = cJSON_PrintUnformatted(ev);
	cJSON_Delete(ev);
	if(payload == NULL) return;
	char topic[300];
	int n = snprintf(topic, sizeof(topic), "$SYS/brokers/%s/started", g.node);
	if(n > 0 && (size_t)n < sizeof(topic)
			&& mosquitto_broker_publish(NULL, topic, (int)strlen(payload), payload, 1, true, NULL) == MOSQ_ERR_SUCCESS){
		g.start_announced = true;
		mosquitto_log_printf(MOSQ_LOG_NOTICE, "kestrel-auth: announced the start of node %s", g.node);
	}
}

static int on_basic_auth(int event, void *event_data, void *userdata)
{
	(void)event;
	(void)userdata;
	struct mosquitto_evt_basic_auth *ed = event_data;
	const char *clientid = mosquitto_client_id(ed->client);
	session_remove(ed->client);
	if(clientid == NULL || bad_identifier(clientid) || bad_identifier(ed->username)) return MOSQ_ERR_AUTH;
	if(gate_refuses(clientid)) return MOSQ_ERR_UNKNOWN; /* closed without CONNACK: the device retries */

	char *body = authn_body(ed->client, ed->username, ed->password);
	if(!body) return MOSQ_ERR_UNKNOWN;
	struct buffer resp = {0};
	char content_type[128];
	long status = post(body, &resp, content_type, sizeof(content_type));
	free(body);

	struct session *s = calloc(1, sizeof(*s));
	int rc = MOSQ_ERR_PLUGIN_DEFER;
	if(s == NULL){
		rc = MOSQ_ERR_NOMEM;
	}else if(status == 204){
		rc = MOSQ_ERR_SUCCESS;
	}else if(status == 200 && !resp.overflow && resp.data
			&& !strncmp(content_type, "application/json", 16)){
		rc = apply_answer(resp.data, ed->client, s);
	}else{
		/* authsvc could not decide: refuse for now, never "not authorized" (the device would give up). */
		if(status){
			mosquitto_log_printf(MOSQ_LOG_WARNING, "kestrel-auth: authsvc answered %ld for %s", status, clientid);
		}
		rc = MOSQ_ERR_UNKNOWN;
	}
	free(resp.data);
	if(rc == MOSQ_ERR_SUCCESS){
		s->client = ed->client;
		s->clientid = strdup(clientid);
		s->username = ed->username ? strdup(ed->username) : NULL;
		if(s->clientid == NULL || (ed->username && s->username == NULL)) rc = MOSQ_ERR_NOMEM;
	}
	if(rc == MOSQ_ERR_SUCCESS){
		s->connected_ms = now_ms();
		session_put(s);
		publish_client_event(ed->client, s, "connected", -1);
	}else if(s){
		session_free(s);
	}
	return rc;
}

static int on_acl_check(int event, void *event_data, void *userdata)
{
	(void)event;
	(void)userdata;
	struct mosquitto_evt_acl_check *ed = event_data;
	/* Delivery and unsubscribe are not authorized (as in EMQX): the filter was checked at SUBSCRIBE. This
	 * also covers messages queued for an offline persistent session, which has no connection state. */
	if(ed->access == MOSQ_ACL_READ || ed->access == MOSQ_ACL_UNSUBSCRIBE) return MOSQ_ERR_SUCCESS;
	struct session *s = session_get(ed->client);
	if(s == NULL || s->revoked) return MOSQ_ERR_ACL_DENIED;
	if(s->expire_at && time(NULL) >= s->expire_at) return MOSQ_ERR_ACL_DENIED;
	if(s->superuser) return MOSQ_ERR_SUCCESS;

	const char *name = ed->topic;
	int action;
	switch(ed->access){
		case MOSQ_ACL_SUBSCRIBE:
			action = KACL_SUBSCRIBE;
			name = kacl_strip_share(ed->topic);
			if(name == NULL) return MOSQ_ERR_ACL_DENIED;
			break;
		case MOSQ_ACL_WRITE: /* a client's PUBLISH, or its will when the broker sends it */
			action = KACL_PUBLISH;
			break;
		default:
			return MOSQ_ERR_ACL_DENIED;
	}
	enum kacl_result result = kacl_check(&s->acl, action, name, ed->qos, ed->retain);
	if(result == KACL_NOMATCH) result = g.no_match_allow ? KACL_ALLOW : KACL_DENY;
	if(result != KACL_ALLOW) return MOSQ_ERR_ACL_DENIED;
	if(action == KACL_SUBSCRIBE) gate_note_subscription(name);
	return MOSQ_ERR_SUCCESS;
}

static int on_disconnect(int event, void *event_data, void *userdata)
{
	(void)event;
	(void)userdata;
	struct mosquitto_evt_disconnect *ed = event_data;
	struct session *s = session_get(ed->client);
	if(s && !s->disconnected_at){
		s->disconnected_at = time(NULL); /* freed by the TICK sweep after will_grace_s */
		publish_client_event(ed->client, s, "disconnected", ed->reason);
	}
	return MOSQ_ERR_SUCCESS;
}

/* True when another live, unexpired session holds the same client id (a takeover happened). */
static bool newer_session_holds(const struct session *old, time_t now)
{
	for(unsigned i = 0; i < (1u << TABLE_BITS); i++){
		for(const struct session *s = g.table[i]; s; s = s->next){
			if(s != old && !s->revoked && !s->disconnected_at && (!s->expire_at || s->expire_at > now)
					&& !strcmp(s->clientid, old->clientid)){
				return true;
			}
		}
	}
	return false;
}

static int on_tick(int event, void *event_data, void *userdata)
{
	(void)event;
	(void)event_data;
	(void)userdata;
	if(!g.start_announced) announce_start();
	time_t now = time(NULL);
	if(now == g.last_sweep) return MOSQ_ERR_SUCCESS;
	g.last_sweep = now;
	/* Free sessions whose connection ended more than will_grace_s ago. */
	for(unsigned i = 0; i < (1u << TABLE_BITS); i++){
		struct session **pp = &g.table[i];
		while(*pp){
			struct session *s = *pp;
			if(s->disconnected_at && now - s->disconnected_at > g.will_grace_s){
				*pp = s->next;
				session_free(s);
				g.sessions--;
			}else{
				pp = &s->next;
			}
		}
	}
	/* Collect first, kick after: a kick fires DISCONNECT synchronously, which changes the session. */
	char **victims = NULL;
	size_t count = 0, cap = 0;
	for(unsigned i = 0; i < (1u << TABLE_BITS); i++){
		for(struct session *s = g.table[i]; s; s = s->next){
			if(s->kicked || s->disconnected_at || !s->expire_at || now < s->expire_at) continue;
			s->kicked = true;
			if(newer_session_holds(s, now)) continue;
			if(count == cap){
				size_t ncap = cap ? cap * 2 : 16;
				char **grown = realloc(victims, ncap * sizeof(*grown));
				if(!grown) break;
				victims = grown;
				cap = ncap;
			}
			victims[count] = strdup(s->clientid);
			if(victims[count]) count++;
		}
	}
	for(size_t i = 0; i < count; i++){
		mosquitto_log_printf(MOSQ_LOG_NOTICE, "kestrel-auth: session of %s expired; disconnecting", victims[i]);
		mosquitto_kick_client_by_clientid(victims[i], false);
		free(victims[i]);
	}
	free(victims);
	return MOSQ_ERR_SUCCESS;
}

/* Mark every session of this client id (or username) revoked, so it is denied everything even before
 * its socket closes. */
static void revoke_matching(const char *clientid, const char *username)
{
	for(unsigned i = 0; i < (1u << TABLE_BITS); i++){
		for(struct session *s = g.table[i]; s; s = s->next){
			if((clientid && !strcmp(s->clientid, clientid))
					|| (username && s->username && !strcmp(s->username, username))){
				s->revoked = true;
			}
		}
	}
}

/* {"commands": [{"command": "kickClient", "clientid": "..."}, {"command": "kickUsername", "username": "..."}]}
 * Only principals whose rules allow publishing to $CONTROL/kestrel/v1 get here: the broker checks the
 * publish ACL before dispatching control messages. */
static int on_control(int event, void *event_data, void *userdata)
{
	(void)event;
	(void)userdata;
	struct mosquitto_evt_control *ed = event_data;
	cJSON *root = cJSON_ParseWithLength(ed->payload, ed->payloadlen);
	const cJSON *commands = cJSON_GetObjectItemCaseSensitive(root, "commands");
	const cJSON *cmd;
	int kicked = 0;
	cJSON_ArrayForEach(cmd, commands){
		const cJSON *name = cJSON_GetObjectItemCaseSensitive(cmd, "command");
		const cJSON *id = cJSON_GetObjectItemCaseSensitive(cmd, "clientid");
		const cJSON *user = cJSON_GetObjectItemCaseSensitive(cmd, "username");
		if(!cJSON_IsString(name)) continue;
		if(!strcmp(name->valuestring, "kickClient") && cJSON_IsString(id)){
			revoke_matching(id->valuestring, NULL);
			mosquitto_kick_client_by_clientid(id->valuestring, false);
			kicked++;
		}else if(!strcmp(name->valuestring, "kickUsername") && cJSON_IsString(user)){
			revoke_matching(NULL, user->valuestring);
			mosquitto_kick_client_by_username(user->valuestring, false);
			kicked++;
		}
	}
	if(!cJSON_IsArray(commands)){
		mosquitto_log_printf(MOSQ_LOG_WARNING, "kestrel-auth: malformed control message ignored");
	}else{
		mosquitto_log_printf(MOSQ_LOG_NOTICE, "kestrel-auth: control: %d kick(s)", kicked);
	}
	cJSON_Delete(root);
	return MOSQ_ERR_SUCCESS;
}

/* ------------------------------------------------------------------------------ lifecycle */

static char *read_secret(const char *path)
{
	FILE *f = fopen(path, "r");
	if(!f) return NULL;
	char buf[512];
	size_t n = fread(buf, 1, sizeof(buf) - 1, f);
	fclose(f);
	buf[n] = '\0';
	while(n && (buf[n - 1] == '\n' || buf[n - 1] == '\r' || buf[n - 1] == ' ')) buf[--n] = '\0';
	return n ? strdup(buf) : NULL;
}

int mosquitto_plugin_version(int count, const int *versions)
{
	for(int i = 0; i < count; i++){
		if(versions[i] == 5) return 5;
	}
	return -1;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *id, void **userdata, struct mosquitto_opt *opts, int n)
{
	(void)userdata;
	const char *key_file = NULL;
	memset(&g, 0, sizeof(g));
	g.id = id;
	g.started_ms = now_ms();
	g.timeout_ms = 1500;
	g.will_grace_s = 3600;
	for(int i = 0; i < n; i++){
		if(!strcmp(opts[i].key, "authn_url")) g.authn_url = strdup(opts[i].value);
		else if(!strcmp(opts[i].key, "broker_key_file")) key_file = opts[i].value;
		else if(!strcmp(opts[i].key, "timeout_ms")) g.timeout_ms = strtol(opts[i].value, NULL, 10);
		else if(!strcmp(opts[i].key, "no_match")) g.no_match_allow = !strcmp(opts[i].value, "allow");
		else if(!strcmp(opts[i].key, "will_grace_s")) g.will_grace_s = strtol(opts[i].value, NULL, 10);
		else if(!strcmp(opts[i].key, "node")) g.node = strdup(opts[i].value);
		else if(!strcmp(opts[i].key, "require_subscriptions")){
			if(parse_required(opts[i].value)){
				mosquitto_log_printf(MOSQ_LOG_ERR, "kestrel-auth: at most %d require_subscriptions", MAX_REQUIRED);
				return MOSQ_ERR_INVAL;
			}
		}
		else {
			mosquitto_log_printf(MOSQ_LOG_ERR, "kestrel-auth: unknown option plugin_opt_%s", opts[i].key);
			return MOSQ_ERR_INVAL;
		}
	}
	if(!g.authn_url || !key_file){
		mosquitto_log_printf(MOSQ_LOG_ERR, "kestrel-auth: plugin_opt_authn_url and plugin_opt_broker_key_file are required");
		return MOSQ_ERR_INVAL;
	}
	if(g.node == NULL) g.node = strdup("mosquitto");
	if(g.node == NULL || bad_identifier(g.node)){
		mosquitto_log_printf(MOSQ_LOG_ERR, "kestrel-auth: plugin_opt_node must be a plain identifier");
		return MOSQ_ERR_INVAL;
	}
	g.gate_open = g.required_count == 0;
	if(g.timeout_ms <= 0) g.timeout_ms = 1500;
	if(g.will_grace_s < 0) g.will_grace_s = 3600;
	g.broker_key = read_secret(key_file);
	if(!g.broker_key){
		mosquitto_log_printf(MOSQ_LOG_ERR, "kestrel-auth: cannot read a key from %s", key_file);
		return MOSQ_ERR_INVAL;
	}
	if(curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK || !(g.curl = curl_easy_init())) return MOSQ_ERR_UNKNOWN;
	char header[600];
	snprintf(header, sizeof(header), "x-authsvc-key: %s", g.broker_key);
	g.headers = curl_slist_append(NULL, "content-type: application/json");
	g.headers = curl_slist_append(g.headers, "accept: application/json");
	g.headers = curl_slist_append(g.headers, header);
	g.headers = curl_slist_append(g.headers, "expect:");
	memset(header, 0, sizeof(header));

	int rc = mosquitto_callback_register(id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL, NULL);
	if(!rc) rc = mosquitto_callback_register(id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL, NULL);
	if(!rc) rc = mosquitto_callback_register(id, MOSQ_EVT_DISCONNECT, on_disconnect, NULL, NULL);
	if(!rc) rc = mosquitto_callback_register(id, MOSQ_EVT_TICK, on_tick, NULL, NULL);
	if(!rc) rc = mosquitto_callback_register(id, MOSQ_EVT_CONTROL, on_control, CONTROL_TOPIC, NULL);
	if(!rc) mosquitto_log_printf(MOSQ_LOG_NOTICE, "kestrel-auth: authenticating against %s", g.authn_url);
	return rc;
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *opts, int n)
{
	(void)userdata;
	(void)opts;
	(void)n;
	mosquitto_callback_unregister(g.id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL);
	mosquitto_callback_unregister(g.id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL);
	mosquitto_callback_unregister(g.id, MOSQ_EVT_DISCONNECT, on_disconnect, NULL);
	mosquitto_callback_unregister(g.id, MOSQ_EVT_TICK, on_tick, NULL);
	mosquitto_callback_unregister(g.id, MOSQ_EVT_CONTROL, on_control, CONTROL_TOPIC);
	for(unsigned i = 0; i < (1u << TABLE_BITS); i++){
		while(g.table[i]){
			struct session *s = g.table[i];
			g.table[i] = s->next;
			session_free(s);
		}
	}
	curl_slist_free_all(g.headers);
	curl_easy_cleanup(g.curl);
	curl_global_cleanup();
	if(g.broker_key){
		memset(g.broker_key, 0, strlen(g.broker_key));
		free(g.broker_key);
	}
	free(g.authn_url);
	free(g.node);
	for(size_t i = 0; i < g.required_count; i++) free(g.required[i]);
	return MOSQ_ERR_SUCCESS;
}
