package main

// Errors in the shape the OpenAI SDKs parse: {"error": {"message", "type", "param", "code"}}, with the HTTP
// status they map to exception classes (401 AuthenticationError, 404 NotFoundError, 400 BadRequestError,
// 429 RateLimitError, ...). Unknown routes are 404 and wrong methods 405 (a 501 would make the SDK retry).

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math"
	"net/http"
	"regexp"
	"strconv"
	"strings"

	"github.com/golang/protobuf/ptypes"
	"github.com/grpc-ecosystem/grpc-gateway/runtime"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// httpStatusFromCode is grpc-gateway's mapping except FAILED_PRECONDITION (400, as OpenAI answers a request
// that cannot be served as sent) and CANCELLED (499: the client went away; 408 would invite a retry).
func httpStatusFromCode(code codes.Code) int {
	switch code {
	case codes.FailedPrecondition:
		return http.StatusBadRequest
	case codes.Canceled:
		return 499
	}
	return runtime.HTTPStatusFromCode(code)
}

func errorType(httpStatus int) string {
	switch {
	case httpStatus == http.StatusUnauthorized:
		return "authentication_error"
	case httpStatus == http.StatusForbidden:
		return "permission_error"
	case httpStatus == http.StatusNotFound:
		return "not_found_error"
	case httpStatus == http.StatusTooManyRequests:
		return "rate_limit_error"
	case httpStatus == http.StatusServiceUnavailable:
		return "service_unavailable_error"
	case httpStatus == http.StatusGatewayTimeout:
		return "timeout_error"
	case httpStatus >= 500:
		return "server_error"
	}
	return "invalid_request_error"
}

// errorCodeFor names the failure like OpenAI's `code` where there is an equivalent, else by the gRPC code.
func errorCodeFor(s *status.Status) string {
	switch s.Code() {
	case codes.Unauthenticated:
		return "invalid_api_key"
	case codes.NotFound:
		if strings.HasPrefix(s.Message(), "model ") {
			return "model_not_found"
		}
	}
	return strings.ToLower(codeName(s.Code()))
}

var codeNames = map[codes.Code]string{
	codes.OK: "OK", codes.Canceled: "CANCELLED", codes.Unknown: "UNKNOWN", codes.InvalidArgument: "INVALID_ARGUMENT",
	codes.DeadlineExceeded: "DEADLINE_EXCEEDED", codes.NotFound: "NOT_FOUND", codes.AlreadyExists: "ALREADY_EXISTS",
	codes.PermissionDenied: "PERMISSION_DENIED", codes.ResourceExhausted: "RESOURCE_EXHAUSTED",
	codes.FailedPrecondition: "FAILED_PRECONDITION", codes.Aborted: "ABORTED", codes.OutOfRange: "OUT_OF_RANGE",
	codes.Unimplemented: "UNIMPLEMENTED", codes.Internal: "INTERNAL", codes.Unavailable: "UNAVAILABLE",
	codes.DataLoss: "DATA_LOSS", codes.Unauthenticated: "UNAUTHENTICATED",
}

// codeName is the canonical gRPC name (INVALID_ARGUMENT), as the gateway's logs and Python clients spell it.
func codeName(c codes.Code) string {
	if name, ok := codeNames[c]; ok {
		return name
	}
	return fmt.Sprintf("CODE_%d", uint32(c))
}

func openAIErrorBody(httpStatus int, message, param, code string) (int, []byte) {
	e := map[string]interface{}{"message": message, "type": errorType(httpStatus), "param": nil, "code": nil}
	if param != "" {
		e["param"] = param
	}
	if code != "" {
		e["code"] = code
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false) // messages quote `<key>` and the like; keep them readable
	enc.Encode(map[string]interface{}{"error": e})
	return httpStatus, bytes.TrimRight(buf.Bytes(), "\n")
}

func writeOpenAIError(w http.ResponseWriter, _ *http.Request, httpStatus int, message, param, code string) {
	_, body := openAIErrorBody(httpStatus, message, param, code)
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(body)+1))
	w.WriteHeader(httpStatus)
	w.Write(append(body, '\n'))
}

// writeGRPCError replaces runtime.HTTPError: a gRPC status (from the gateway, or the gateway's request decoder)
// becomes its HTTP status, the OpenAI error body, the exposed response metadata and a Retry-After header.
func writeGRPCError(ctx context.Context, _ *runtime.ServeMux, _ runtime.Marshaler, w http.ResponseWriter,
	r *http.Request, err error) {
	state := stateFrom(ctx)
	s := status.Convert(err)
	httpStatus := httpStatusFromCode(s.Code())
	md, _ := runtime.ServerMetadataFromContext(ctx)
	exposeMetadata(w, md.HeaderMD, state)
	exposeWorker(w, md.TrailerMD, state.trailer) // a request that failed on a worker names it, as its gRPC trailer does
	if after := retryAfter(s, md.TrailerMD, state.trailer, md.HeaderMD); after != "" {
		w.Header().Set("Retry-After", after)
	}
	// The gateway marks errors that no retry can fix (a request larger than a whole limit); the OpenAI SDK
	// honours this header and does not retry them.
	for _, m := range []metadata.MD{md.TrailerMD, state.trailer, md.HeaderMD} {
		if v := m.Get("x-should-retry"); len(v) > 0 {
			w.Header().Set("X-Should-Retry", v[0])
			break
		}
	}
	writeOpenAIError(w, r, httpStatus, grpcMessage(s, state), paramFromMessage(s.Message(), state), errorCodeFor(s))
}

// grpcMessage is the status message, with the JSON field names the client used (prompt for prompts).
func grpcMessage(s *status.Status, state *requestState) string {
	msg := s.Message()
	if s.Code() == codes.Unavailable && strings.HasPrefix(msg, "connection error") {
		return "the llmserve gateway is unreachable: " + msg
	}
	for proto, shown := range state.renames {
		if strings.HasPrefix(msg, proto) {
			msg = shown + msg[len(proto):]
		}
	}
	return msg
}

// The gateway's validation messages start with the field they are about: "temperature=5 is out of range ...",
// "messages[0].role='x' is invalid ...", "prompts has 40 entries ...", "model 'x' not found ...".
// The field a gateway message starts with ("tools[1].function.name 'x' is already ...", "tool_choice names ..."): up
// to two indexes, then up to three dotted (optionally indexed) parts.
var leadingField = regexp.MustCompile(
	`^([a-z_]+)((?:\[\d+\]){0,2}(?:\.[a-z_]+(?:\[\d+\])?){0,3})(?:=| is | has | must | and | names | needs | '[^']*' )`)

var requestFields = func() map[string]bool {
	known := map[string]bool{"messages": true, "prompt": true, "input": true, "tools": true, "tool_choice": true}
	for _, fields := range fieldsByKind {
		for name := range fields {
			known[name] = true
		}
	}
	return known
}()

func paramFromMessage(msg string, state *requestState) string {
	for proto, shown := range state.renames { // prompt_token_ids[0][3] of a one-prompt request is prompt[3]
		if strings.Contains(proto, "[") && strings.HasPrefix(msg, proto) {
			msg = shown + msg[len(proto):]
		}
	}
	m := leadingField.FindStringSubmatch(msg)
	if m == nil || !requestFields[m[1]] {
		return ""
	}
	name := m[1]
	if shown, ok := state.renames[name]; ok {
		name = shown
	}
	return name + m[2]
}

// retryAfter finds a retry delay in whole seconds: the `retry-after` metadata the gateway sends with
// RESOURCE_EXHAUSTED (trailing, or leading), else a google.rpc.RetryInfo detail.
func retryAfter(s *status.Status, mds ...metadata.MD) string {
	for _, md := range mds {
		for _, v := range md.Get("retry-after") {
			if secs, err := strconv.ParseFloat(strings.TrimSpace(v), 64); err == nil && secs >= 0 &&
				!math.IsInf(secs, 0) {
				return strconv.FormatInt(int64(math.Ceil(secs)), 10)
			}
		}
	}
	for _, d := range s.Proto().GetDetails() {
		var info errdetails.RetryInfo
		if ptypes.Is(d, &info) && ptypes.UnmarshalAny(d, &info) == nil && info.GetRetryDelay() != nil {
			if delay, err := ptypes.Duration(info.GetRetryDelay()); err == nil && delay >= 0 {
				return strconv.FormatInt(int64(math.Ceil(delay.Seconds())), 10)
			}
		}
	}
	return ""
}

// writeRoutingError replaces runtime.OtherErrorHandler: unknown routes (404) and wrong methods (405).
func writeRoutingError(w http.ResponseWriter, r *http.Request, msg string, code int) {
	switch code {
	case http.StatusNotFound:
		writeOpenAIError(w, r, code, fmt.Sprintf("Unknown request URL: %s %s. The API serves POST /v1/completions, "+
			"POST /v1/chat/completions, POST /v1/embeddings, GET /v1/models and GET /health.", r.Method,
			r.URL.EscapedPath()), "", "unknown_url")
	case http.StatusMethodNotAllowed:
		writeOpenAIError(w, r, code, fmt.Sprintf("Method %s is not allowed for %s.", r.Method, r.URL.EscapedPath()),
			"", "method_not_allowed")
	default:
		writeOpenAIError(w, r, code, msg, "", strings.ToLower(strings.ReplaceAll(http.StatusText(code), " ", "_")))
	}
}
