// /api/docs: Swagger UI over /api/openapi.json (served from here: no CDN, no external validator).
window.addEventListener("load", () => {
  window.ui = SwaggerUIBundle({ url: document.body.dataset.spec, dom_id: "#swagger-ui", deepLinking: true,
                                validatorUrl: null });
});
