/* The plugin's topic matching and rule evaluation against EMQX 5.8 semantics; run by `make test` here
 * and by tests/unit/test_mosquitto_acl.py. Exits non-zero on the first failure. */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "acl.h"

static int failures;

#define CHECK(cond) do { if(!(cond)){ fprintf(stderr, "FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond); failures++; } } while(0)

static void test_match(void)
{
	CHECK(kacl_topic_match("a/b", "a/b"));
	CHECK(!kacl_topic_match("a/b", "a/c"));
	CHECK(kacl_topic_match("a/b", "a/+"));
	CHECK(kacl_topic_match("a/b/c", "a/#"));
	CHECK(kacl_topic_match("a", "a/#"));
	CHECK(kacl_topic_match("a/b", "#"));
	CHECK(!kacl_topic_match("a/b/c", "a/+"));
	CHECK(!kacl_topic_match("a", "a/+"));
	CHECK(!kacl_topic_match("a/b", "a/b/c"));
	/* a wildcard in the request is matched only by a wildcard in the rule */
	CHECK(kacl_topic_match("a/+", "a/+"));
	CHECK(kacl_topic_match("a/+", "a/#"));
	CHECK(!kacl_topic_match("a/+", "a/b"));
	CHECK(!kacl_topic_match("a/#", "a/+"));
	CHECK(!kacl_topic_match("a/#", "a/b"));
	CHECK(kacl_topic_match("a/#", "a/#"));
	CHECK(!kacl_topic_match("#", "a/#"));
	CHECK(!kacl_topic_match("+/#", "a/#"));
	/* $-topics are never matched by a leading wildcard */
	CHECK(!kacl_topic_match("$SYS/x", "#"));
	CHECK(!kacl_topic_match("$SYS/x", "+/x"));
	CHECK(!kacl_topic_match("$CONTROL/kestrel/v1", "#"));
	CHECK(kacl_topic_match("$CONTROL/kestrel/v1", "$CONTROL/kestrel/v1"));
	/* empty levels */
	CHECK(kacl_topic_match("a//b", "a/+/b"));
	CHECK(!kacl_topic_match("a//b", "a/b"));
	CHECK(kacl_topic_match("/a", "+/a"));
}

static void test_share(void)
{
	CHECK(!strcmp(kacl_strip_share("$share/g/a/b"), "a/b"));
	CHECK(!strcmp(kacl_strip_share("a/b"), "a/b"));
	CHECK(kacl_strip_share("$share/g") == NULL);
	CHECK(kacl_strip_share("$share//a") == NULL);
	CHECK(kacl_strip_share("$share/g/") == NULL);
}

static struct kacl parse(const char *json, int expect_rc)
{
	struct kacl acl = {0};
	const char *why = NULL;
	cJSON *doc = cJSON_Parse(json);
	int rc = kacl_parse(doc, &acl, &why);
	if(rc != expect_rc){
		fprintf(stderr, "FAIL parse %s: rc %d (%s)\n", json, rc, why ? why : "");
		failures++;
	}
	cJSON_Delete(doc);
	return acl;
}

static void test_rules(void)
{
	struct kacl acl = parse(
		"[{\"permission\":\"allow\",\"action\":\"publish\",\"topic\":\"v1/t/d/x/telemetry\"},"
		" {\"permission\":\"allow\",\"action\":\"subscribe\",\"topic\":\"v1/t/d/x/cmd/+\",\"qos\":[0,1]},"
		" {\"permission\":\"allow\",\"action\":\"publish\",\"topic\":\"v1/t/d/x/status\",\"retain\":true},"
		" {\"permission\":\"allow\",\"action\":\"pub\",\"topics\":[\"eq v1/t/d/x/+\"],\"qos\":\"0,1\"},"
		" {\"permission\":\"deny\",\"action\":\"all\",\"topic\":\"#\"}]", 0);
	CHECK(acl.count == 5);
	CHECK(kacl_check(&acl, KACL_PUBLISH, "v1/t/d/x/telemetry", 1, false) == KACL_ALLOW);
	CHECK(kacl_check(&acl, KACL_SUBSCRIBE, "v1/t/d/x/telemetry", 1, false) == KACL_DENY);
	CHECK(kacl_check(&acl, KACL_PUBLISH, "v1/t/d/y/telemetry", 1, false) == KACL_DENY);
	CHECK(kacl_check(&acl, KACL_SUBSCRIBE, "v1/t/d/x/cmd/+", 1, false) == KACL_ALLOW);
	CHECK(kacl_check(&acl, KACL_SUBSCRIBE, "v1/t/d/x/cmd/reboot", 0, false) == KACL_ALLOW);
	CHECK(kacl_check(&acl, KACL_SUBSCRIBE, "v1/t/d/x/cmd/reboot", 2, false) == KACL_DENY);
	CHECK(kacl_check(&acl, KACL_SUBSCRIBE, "v1/t/d/x/cmd/#", 1, false) == KACL_DENY);
	CHECK(kacl_check(&acl, KACL_SUBSCRIBE, "#", 0, false) == KACL_DENY);
	CHECK(kacl_check(&acl, KACL_SUBSCRIBE, "$SYS/#", 0, false) == KACL_NOMATCH);
	CHECK(kacl_check(&acl, KACL_PUBLISH, "v1/t/d/x/status", 1, true) == KACL_ALLOW);
	CHECK(kacl_check(&acl, KACL_PUBLISH, "v1/t/d/x/status", 1, false) == KACL_DENY);
	/* "eq " matches the string itself only */
	CHECK(kacl_check(&acl, KACL_PUBLISH, "v1/t/d/x/+", 0, false) == KACL_ALLOW);
	CHECK(kacl_check(&acl, KACL_PUBLISH, "v1/t/d/x/other", 0, false) == KACL_DENY);
	kacl_free(&acl);

	/* any invalid rule rejects the whole list (EMQX: bad_username_or_password) */
	parse("{\"permission\":\"allow\"}", -1);
	parse("[{\"permission\":\"maybe\",\"action\":\"all\",\"topic\":\"#\"}]", -1);
	parse("[{\"permission\":\"allow\",\"action\":\"read\",\"topic\":\"#\"}]", -1);
	parse("[{\"permission\":\"allow\",\"action\":\"all\"}]", -1);
	parse("[{\"permission\":\"allow\",\"action\":\"all\",\"topic\":\"\"}]", -1);
	parse("[{\"permission\":\"allow\",\"action\":\"all\",\"topic\":\"a\",\"qos\":3}]", -1);
	parse("[{\"permission\":\"allow\",\"action\":\"all\",\"topic\":\"a\",\"qos\":[0,7]}]", -1);
	parse("[{\"permission\":\"allow\",\"action\":\"all\",\"topic\":\"a\",\"retain\":\"sometimes\"}]", -1);
	parse("[{\"permission\":\"allow\",\"action\":\"all\",\"topic\":\"v1/${clientid}/#\"}]", -1);
	parse("[{\"permission\":\"allow\",\"action\":\"all\",\"topic\":\"a\"}, 5]", -1);
	struct kacl empty = parse("[]", 0);
	CHECK(kacl_check(&empty, KACL_PUBLISH, "a", 0, false) == KACL_NOMATCH);
}

int main(void)
{
	test_match();
	test_share();
	test_rules();
	if(failures){
		fprintf(stderr, "%d failure(s)\n", failures);
		return 1;
	}
	puts("acl_test: all checks passed");
	return 0;
}
