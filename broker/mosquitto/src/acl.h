/* ACL rules as authsvc returns them (EMQX 5.8 `acl` format) and their evaluation.
 *
 * Pure functions with no broker dependency, so tests/acl_test.c can exercise them directly.
 */
#ifndef KESTREL_ACL_H
#define KESTREL_ACL_H

#include <stdbool.h>
#include <stddef.h>

enum kacl_action { KACL_PUBLISH = 1, KACL_SUBSCRIBE = 2, KACL_ALL = 3 };
enum kacl_retain { KACL_RETAIN_ANY = 0, KACL_RETAIN_TRUE = 1, KACL_RETAIN_FALSE = 2 };
enum kacl_result { KACL_NOMATCH = 0, KACL_ALLOW = 1, KACL_DENY = 2 };

struct kacl_rule {
	bool allow;
	int action;     /* bit set of KACL_PUBLISH / KACL_SUBSCRIBE */
	bool exact;     /* "eq " prefix: the requested filter must equal the rule string */
	char *topic;
	unsigned qos_mask; /* bit n set: QoS n allowed; 0x7 = any */
	int retain;
};

struct kacl {
	struct kacl_rule *rules;
	size_t count;
};

/* Parse the `acl` array of an authn response (cJSON). Returns 0 and fills *out, or -1 with a reason
 * in *why (a static string) when any rule is invalid: EMQX then rejects the whole connect. */
struct cJSON;
int kacl_parse(const struct cJSON *array, struct kacl *out, const char **why);
void kacl_free(struct kacl *acl);

/* EMQX emqx_topic:match/2 semantics for a requested topic or filter `name` against a rule filter:
 * levels compared one by one; '+' in the rule matches any one level; '#' in the rule matches the
 * rest; a wildcard in the request matches only the same wildcard in the rule ('#' in the request is
 * matched only by '#', stricter than EMQX, which lets '+' match it); rule wildcards in the first
 * level never match a request starting with '$'. */
bool kacl_topic_match(const char *name, const char *filter);

/* First matching rule wins. `name` for subscribe has any "$share/<group>/" prefix already removed. */
enum kacl_result kacl_check(const struct kacl *acl, int action, const char *name, int qos, bool retain);

/* "$share/<group>/<filter>" -> "<filter>"; other strings unchanged; NULL for a malformed share. */
const char *kacl_strip_share(const char *filter);

#endif
