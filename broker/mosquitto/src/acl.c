/* ACL parsing and evaluation with EMQX 5.8 semantics (broker-auth-contract.md §1, §4). */
#include "acl.h"

#include <cjson/cJSON.h>
#include <stdlib.h>
#include <string.h>

static int parse_action(const char *s)
{
	if(!strcmp(s, "publish") || !strcmp(s, "pub")) return KACL_PUBLISH;
	if(!strcmp(s, "subscribe") || !strcmp(s, "sub")) return KACL_SUBSCRIBE;
	if(!strcmp(s, "all")) return KACL_ALL;
	return 0;
}

static int parse_qos(const cJSON *q, unsigned *mask)
{
	*mask = 0;
	if(q == NULL){
		*mask = 0x7;
		return 0;
	}
	if(cJSON_IsNumber(q)){
		if(q->valuedouble != 0 && q->valuedouble != 1 && q->valuedouble != 2) return -1;
		*mask = 1u << q->valueint;
		return 0;
	}
	if(cJSON_IsArray(q)){
		const cJSON *item;
		cJSON_ArrayForEach(item, q){
			if(!cJSON_IsNumber(item) || item->valueint < 0 || item->valueint > 2
					|| item->valuedouble != (double)item->valueint){
				return -1;
			}
			*mask |= 1u << item->valueint;
		}
		return *mask ? 0 : -1;
	}
	if(cJSON_IsString(q)){
		/* "0,1" */
		for(const char *p = q->valuestring; *p; p++){
			if(*p >= '0' && *p <= '2') *mask |= 1u << (*p - '0');
			else if(*p != ',' && *p != ' ') return -1;
		}
		return *mask ? 0 : -1;
	}
	return -1;
}

static int parse_retain(const cJSON *r, int *out)
{
	if(r == NULL){ *out = KACL_RETAIN_ANY; return 0; }
	if(cJSON_IsBool(r)){ *out = cJSON_IsTrue(r) ? KACL_RETAIN_TRUE : KACL_RETAIN_FALSE; return 0; }
	if(cJSON_IsString(r)){
		if(!strcmp(r->valuestring, "all")){ *out = KACL_RETAIN_ANY; return 0; }
		if(!strcmp(r->valuestring, "true")){ *out = KACL_RETAIN_TRUE; return 0; }
		if(!strcmp(r->valuestring, "false")){ *out = KACL_RETAIN_FALSE; return 0; }
	}
	return -1;
}

static int add_rule(struct kacl *acl, size_t *cap, bool allow, int action, const char *topic,
		unsigned qos_mask, int retain)
{
	if(topic[0] == '\0') return -1;
	if(acl->count == *cap){
		size_t ncap = *cap ? *cap * 2 : 8;
		struct kacl_rule *n = realloc(acl->rules, ncap * sizeof(*n));
		if(!n) return -1;
		acl->rules = n;
		*cap = ncap;
	}
	struct kacl_rule *r = &acl->rules[acl->count];
	r->allow = allow;
	r->action = action;
	r->exact = strncmp(topic, "eq ", 3) == 0;
	r->topic = strdup(r->exact ? topic + 3 : topic);
	if(!r->topic) return -1;
	/* Placeholders are never sent by authsvc (concrete topics only); refuse them rather than
	 * matching the literal text. */
	if(strstr(r->topic, "${")){
		free(r->topic);
		return -1;
	}
	r->qos_mask = qos_mask;
	r->retain = retain;
	acl->count++;
	return 0;
}

int kacl_parse(const cJSON *array, struct kacl *out, const char **why)
{
	size_t cap = 0;
	out->rules = NULL;
	out->count = 0;
	if(array == NULL) return 0;
	if(!cJSON_IsArray(array)){ *why = "acl is not a list"; return -1; }
	const cJSON *rule;
	cJSON_ArrayForEach(rule, array){
		const cJSON *perm = cJSON_GetObjectItemCaseSensitive(rule, "permission");
		const cJSON *act = cJSON_GetObjectItemCaseSensitive(rule, "action");
		const cJSON *topic = cJSON_GetObjectItemCaseSensitive(rule, "topic");
		const cJSON *topics = cJSON_GetObjectItemCaseSensitive(rule, "topics");
		unsigned qos_mask;
		int retain, action;
		bool allow;
		if(!cJSON_IsObject(rule) || !cJSON_IsString(perm) || !cJSON_IsString(act)){
			*why = "acl rule lacks permission or action"; goto fail;
		}
		if(!strcmp(perm->valuestring, "allow")) allow = true;
		else if(!strcmp(perm->valuestring, "deny")) allow = false;
		else { *why = "acl rule permission is not allow|deny"; goto fail; }
		action = parse_action(act->valuestring);
		if(!action){ *why = "acl rule action is not publish|subscribe|all"; goto fail; }
		if(parse_qos(cJSON_GetObjectItemCaseSensitive(rule, "qos"), &qos_mask)){
			*why = "acl rule qos is invalid"; goto fail;
		}
		if(parse_retain(cJSON_GetObjectItemCaseSensitive(rule, "retain"), &retain)){
			*why = "acl rule retain is invalid"; goto fail;
		}
		if(cJSON_IsString(topic)){
			if(add_rule(out, &cap, allow, action, topic->valuestring, qos_mask, retain)){
				*why = "acl rule topic is invalid"; goto fail;
			}
		}else if(cJSON_IsArray(topics) && cJSON_GetArraySize(topics) > 0){
			const cJSON *t;
			cJSON_ArrayForEach(t, topics){
				if(!cJSON_IsString(t) || add_rule(out, &cap, allow, action, t->valuestring, qos_mask, retain)){
					*why = "acl rule topics are invalid"; goto fail;
				}
			}
		}else{
			*why = "acl rule has no topic"; goto fail;
		}
	}
	return 0;
fail:
	kacl_free(out);
	return -1;
}

void kacl_free(struct kacl *acl)
{
	for(size_t i = 0; i < acl->count; i++) free(acl->rules[i].topic);
	free(acl->rules);
	acl->rules = NULL;
	acl->count = 0;
}

/* Length of the level starting at s (up to '/' or end). */
static size_t level_len(const char *s)
{
	const char *slash = strchr(s, '/');
	return slash ? (size_t)(slash - s) : strlen(s);
}

bool kacl_topic_match(const char *name, const char *filter)
{
	if(name[0] == '$' && (filter[0] == '+' || filter[0] == '#')) return false;
	const char *n = name, *f = filter;
	for(;;){
		size_t nl = level_len(n), fl = level_len(f);
		if(fl == 1 && f[0] == '#' && f[1] == '\0') return true;
		bool n_end = false, f_end = false;
		if(fl == 1 && f[0] == '+'){
			if(nl == 1 && n[0] == '#') return false; /* '#' in the request only matches '#' */
		}else if(nl != fl || memcmp(n, f, nl) != 0){
			return false;
		}
		n_end = n[nl] == '\0';
		f_end = f[fl] == '\0';
		if(n_end || f_end){
			if(n_end && f_end) return true;
			/* "a" matches "a/#" (the parent level) as in MQTT and EMQX */
			return n_end && !strcmp(f + fl, "/#");
		}
		n += nl + 1;
		f += fl + 1;
	}
}

enum kacl_result kacl_check(const struct kacl *acl, int action, const char *name, int qos, bool retain)
{
	for(size_t i = 0; i < acl->count; i++){
		const struct kacl_rule *r = &acl->rules[i];
		if(!(r->action & action)) continue;
		if(qos >= 0 && qos <= 2 && !(r->qos_mask & (1u << qos))) continue;
		if(action == KACL_PUBLISH && r->retain != KACL_RETAIN_ANY
				&& (r->retain == KACL_RETAIN_TRUE) != retain){
			continue;
		}
		bool hit = r->exact ? strcmp(name, r->topic) == 0 : kacl_topic_match(name, r->topic);
		if(hit) return r->allow ? KACL_ALLOW : KACL_DENY;
	}
	return KACL_NOMATCH;
}

const char *kacl_strip_share(const char *filter)
{
	if(strncmp(filter, "$share/", 7) != 0) return filter;
	const char *group = filter + 7;
	const char *slash = strchr(group, '/');
	if(slash == NULL || slash == group || slash[1] == '\0') return NULL;
	return slash + 1;
}
